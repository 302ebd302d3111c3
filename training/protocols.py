"""The out-of-distribution protocols in one command: Fashion-MNIST -> MNIST, and MNIST and Fashion-MNIST with each
class held out in turn.

``python -m training ood protocols`` trains (or reuses) one model per protocol with the training command line,
exactly as a user runs it and with the same options for every model, evaluates every score kind and every
model-free baseline of each with ``training.ood.evaluate_artifact`` (the artifact's own ``score``, calibration
and references: what is served), and with ``--candidates`` the detectors measured beside them
(``training.candidates``). It prints an AUROC table per group of protocols (each held-out class, the mean and
the worst), the default's false-positive rates at alpha, and where the default falls below plain likelihood
or compressed size alone; ``<work>/ood.json`` holds every number.

A protocol's model is ``<work>/<protocol>/vae.ts``; an existing one is reused (``--retrain`` trains again), and
``--model PROTOCOL=PATH`` names one trained elsewhere. A model without the latent density the training command
now writes is given one first (``ood calibrate --latent-density``: the same weights), written to
``<work>/<protocol>/vae.ts``. ``--train-limit N`` trains on a subset: the first N pool images of the source,
written with its full test split to ``<work>/data/`` as an npz (quick runs only: the calib and val splits shrink
with it).
"""

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from training.calibration import artifact_latent, recalibrate
from training.data import load_dataset, to_8bit
from training.ood import ALPHAS, detection_metrics, evaluate_artifact
from training.recipe import recorded_dataset
from vae_artifact.io import load_artifact

METRICS = ("auroc", "auprc", "fpr_at_95_tpr", *(f"fpr_at_alpha_{a}" for a in ALPHAS))
SETS = {"mnist": "mnist", "fashion": "fashion-mnist"}  # held-out-class protocol prefix -> directory in --data-dir
GROUPS = {"fashion-to-mnist": "Fashion-MNIST -> MNIST", "mnist": "MNIST, one class held out",
          "fashion": "Fashion-MNIST, one class held out"}
PLAIN = ("nll", "size-bz2")  # the default must not fall below these on any protocol


@dataclass(frozen=True)
class Protocol:
    name: str  # fashion, mnist-no<C>, fashion-no<C>
    train_data: str  # the idx: source the model is trained on
    classes: Optional[Tuple[int, ...]]  # trained on these labels only (None: all)
    ood_data: Optional[str]  # another source whose test split is OOD, or
    holdout_class: Optional[int]  # the train source's test images of this class are OOD

    @property
    def group(self) -> str:
        return "fashion-to-mnist" if self.holdout_class is None else self.name.split("-no")[0]


def protocols(data_dir: Path, holdout_classes: Sequence[int], sets: Sequence[str] = ("mnist",)) -> List[Protocol]:
    mnist, fashion = f"idx:{data_dir / 'mnist'}", f"idx:{data_dir / 'fashion-mnist'}"
    found = [Protocol("fashion", fashion, None, mnist, None)]
    for prefix in sets:
        source = f"idx:{data_dir / SETS[prefix]}"
        found += [Protocol(f"{prefix}-no{c}", source, tuple(i for i in range(10) if i != c), None, c)
                  for c in holdout_classes]
    return found


def subset_source(spec: str, n: int, directory: Path) -> str:
    """An npz of the first ``n`` pool images (+ labels) of ``spec`` and its whole test split; its data spec."""
    out = directory / f"{spec.rsplit('/', 1)[-1]}-{n}.npz"
    if not out.exists():
        raw = load_dataset(spec, val_fraction=0.0, calib_fraction=0.0)  # every pool image in train, in order
        directory.mkdir(parents=True, exist_ok=True)
        np.savez(out, x_train=raw.train.images[:n], y_train=raw.train.labels[:n], x_test=raw.test.images,
                 y_test=raw.test.labels)
    return f"npz:{out}"


def train(protocol: Protocol, data: str, out: Path, args: argparse.Namespace) -> None:
    """The protocol's model, trained by the training command line, exactly as a user runs it."""
    argv = ["train", "--data", data, "--epochs", str(args.epochs), "--eval-k", str(args.k), "--score-k", str(args.k),
            "--base-width", str(args.base_width), "--no-report", "--quiet", "--out", str(out), *args.train_args]
    if protocol.classes is not None:
        argv += ["--classes", ",".join(map(str, protocol.classes))]
    print(f"[{protocol.name}] python -m training {' '.join(argv)}", flush=True)
    subprocess.run([sys.executable, "-m", "training", *argv], check=True)


def test_sets(protocol: Protocol, data: str, limit: Optional[int]) -> Tuple[np.ndarray, np.ndarray]:
    """(normal, OOD) 8-bit test images: the first ``limit`` of each."""
    ds = load_dataset(data)
    normal = to_8bit(ds.test.images, ds.levels)
    if protocol.holdout_class is not None:
        is_ood = ds.test.labels == protocol.holdout_class
        normal, ood = normal[~is_ood], normal[is_ood]
    else:
        other = load_dataset(protocol.ood_data)
        ood = to_8bit(other.test.images, other.levels)
    return normal[:limit], ood[:limit]


def with_density(path: Path, out: Path) -> Path:
    """``path``, or where a model without the latent density got one (the same weights) when it had none."""
    _, meta = load_artifact(path)
    if "latent_log_density" in meta.get("methods", {}):
        return path
    print(f"[{out.parent.name}] fitting the latent density into {out}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    recalibrate(path, out=out, latent_density=True)
    return out


def run(args: argparse.Namespace) -> Dict:
    given = dict(args.model)
    results = {}
    for protocol in protocols(args.data_dir, args.holdout_classes, args.sets):
        data = protocol.train_data
        if args.train_limit:
            data = subset_source(data, args.train_limit, args.work / "data")
        own = args.work / protocol.name / "vae.ts"
        path = given.get(protocol.name, own)
        if protocol.name not in given and (args.retrain or not path.exists()):
            train(protocol, data, path, args)
        path = with_density(path, own)
        module, meta = load_artifact(path)
        normal, ood = test_sets(protocol, data, args.limit)
        started = time.perf_counter()
        result = evaluate_artifact(module.score, meta, normal, ood, artifact_latent(module, meta))
        if args.candidates:
            from training.candidates import candidate_scores  # scikit-learn fits and RaPP only when asked

            dataset = recorded_dataset(meta["data"], data=data if args.train_limit else None)
            result["candidates"] = {name: detection_metrics(n, o) for name, (n, o) in
                                    candidate_scores(module, meta, dataset, normal, ood).items()}
        result.update(model=str(path), group=protocol.group, holdout_class=protocol.holdout_class,
                      evaluation=meta["evaluation"], training=meta.get("training"))
        results[protocol.name] = result
        print(f"[{protocol.name}] evaluated in {time.perf_counter() - started:.0f}s", flush=True)
    return {"protocols": results, "groups": group_summaries(results), "checks": checks(results),
            "training_s": sum((r.get("training") or {}).get("wall_time_s", 0.0) for r in results.values())}


def scores_of(result: Dict) -> Dict[str, Dict[str, float]]:
    """Every score of one protocol by name: the kinds, the baselines (model-free), the variants of kinds with
    guards and the candidates."""
    return {**result["kinds"], **result["baselines"], **result.get("variants", {}), **result.get("candidates", {})}


def group_summaries(results: Dict[str, Dict]) -> Dict[str, Dict]:
    """Per group of protocols: each score's mean of every metric, and its worst AUROC, over the group."""
    summaries = {}
    for group in GROUPS:
        members = [r for r in results.values() if r["group"] == group]
        if not members:
            continue
        names = [name for name in scores_of(members[0]) if all(name in scores_of(r) for r in members)]
        summaries[group] = {
            "protocols": [name for name, r in results.items() if r["group"] == group],
            "mean": {name: {m: float(np.mean([scores_of(r)[name][m] for r in members]))
                            for m in METRICS if m in scores_of(members[0])[name]} for name in names},
            "min_auroc": {name: float(min(scores_of(r)[name]["auroc"] for r in members)) for name in names}}
    return summaries


def checks(results: Dict[str, Dict]) -> Dict[str, List[str]]:
    """The default's failings on any protocol: below a plain score (``PLAIN``) in AUROC, or a false-positive
    rate at alpha outside [alpha / 2, 3 alpha / 2]."""
    below, fpr = [], []
    for name, r in results.items():
        default = r["kinds"][r["default"]]
        for plain in PLAIN:
            if plain in scores_of(r) and default["auroc"] < scores_of(r)[plain]["auroc"]:
                below.append(f"{name}: {default['auroc']:.4f} < {plain} {scores_of(r)[plain]['auroc']:.4f}")
        for alpha in ALPHAS:
            rate = default.get(f"fpr_at_alpha_{alpha}")
            if rate is not None and not alpha / 2 <= rate <= 1.5 * alpha:
                fpr.append(f"{name}: FPR {rate:.4f} at alpha {alpha}")
    return {"below_plain": below, "fpr_outside_band": fpr}


def format_tables(summary: Dict) -> str:
    """Per group, one AUROC table (a column per protocol, the mean and the worst); then the default's FPR at
    each alpha per protocol, and the checks."""
    results = summary["protocols"]
    lines = []
    for group, s in summary["groups"].items():
        members = s["protocols"]
        default = results[members[0]]["default"]
        heads = [results[m]["holdout_class"] if results[m]["holdout_class"] is not None else m for m in members]
        lines += ["", f"{GROUPS[group]}: AUROC",
                  f"{'score':28s}" + "".join(f"{str(h):>8s}" for h in heads) + f"{'mean':>8s}{'worst':>8s}"]
        for name in s["mean"]:
            label = name + (" (default)" if name == default else "") + \
                (" (no model)" if name in results[members[0]]["baselines"] else "") + \
                (" (candidate)" if name in results[members[0]].get("candidates", {}) else "")
            lines.append(f"{label:28s}" + "".join(f"{scores_of(results[m])[name]['auroc']:8.4f}" for m in members)
                         + f"{s['mean'][name]['auroc']:8.4f}{s['min_auroc'][name]:8.4f}")
    lines += ["", "the default's false-positive rate at alpha, on the normal test images",
              f"{'protocol':14s}" + "".join(f"{'alpha ' + str(a):>12s}" for a in ALPHAS)]
    for name, r in results.items():
        default = r["kinds"][r["default"]]
        lines.append(f"{name:14s}" + "".join(f"{default.get(f'fpr_at_alpha_{a}', float('nan')):12.4f}" for a in ALPHAS))
    for check, failing in summary["checks"].items():
        lines.append(f"{check}: {'none' if not failing else '; '.join(failing)}")
    return "\n".join(lines)
