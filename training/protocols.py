"""The out-of-distribution protocols in one table: Fashion-MNIST -> MNIST, and MNIST with one class held out.

``python -m training ood protocols`` trains (or reuses) one model per protocol with the training command line,
exactly as a user runs it, evaluates every score kind and every model-free baseline of each with
``training.ood.evaluate_artifact`` (the artifact's own ``score``, calibration and references: what is served),
prints one table and the mean over the held-out classes, and writes the numbers to ``<work>/ood.json``.

A protocol's model is ``<work>/<protocol>/vae.ts``; an existing one is reused (``--retrain`` trains again), and
``--model PROTOCOL=PATH`` names one trained elsewhere. ``--train-limit N`` trains on a subset: the first N
pool images of the source, written with its full test split to ``<work>/data/`` as an npz (quick runs only: the
calib and val splits shrink with it).
"""

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from training.data import load_dataset, to_8bit
from training.calibration import artifact_neighbours
from training.ood import ALPHAS, evaluate_artifact
from vae_artifact.io import load_artifact

METRICS = ("auroc", "auprc", "fpr_at_95_tpr", *(f"fpr_at_alpha_{a}" for a in ALPHAS))


@dataclass(frozen=True)
class Protocol:
    name: str  # fashion, mnist-no<C>
    train_data: str  # the idx: source the model is trained on
    classes: Optional[Tuple[int, ...]]  # trained on these labels only (None: all)
    ood_data: Optional[str]  # another source whose test split is OOD, or
    holdout_class: Optional[int]  # the train source's test images of this class are OOD


def protocols(data_dir: Path, holdout_classes: Sequence[int]) -> List[Protocol]:
    mnist, fashion = f"idx:{data_dir / 'mnist'}", f"idx:{data_dir / 'fashion-mnist'}"
    return [Protocol("fashion", fashion, None, mnist, None)] + [
        Protocol(f"mnist-no{c}", mnist, tuple(i for i in range(10) if i != c), None, c) for c in holdout_classes]


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


def run(args: argparse.Namespace) -> Dict:
    given = dict(args.model)
    results = {}
    for protocol in protocols(args.data_dir, args.holdout_classes):
        data = protocol.train_data
        if args.train_limit:
            data = subset_source(data, args.train_limit, args.work / "data")
        path = given.get(protocol.name, args.work / protocol.name / "vae.ts")
        if protocol.name not in given and (args.retrain or not path.exists()):
            train(protocol, data, path, args)
        module, meta = load_artifact(path)
        normal, ood = test_sets(protocol, data, args.limit)
        started = time.perf_counter()
        result = evaluate_artifact(module.score, meta, normal, ood, artifact_neighbours(module, meta))
        result.update(model=str(path), evaluation=meta["evaluation"], training=meta.get("training"))
        results[protocol.name] = result
        print(f"[{protocol.name}] evaluated in {time.perf_counter() - started:.0f}s", flush=True)
    return {"protocols": results, "heldout_mean": heldout_mean(results)}


def heldout_mean(results: Dict[str, Dict]) -> Dict[str, Dict[str, float]]:
    """Each kind's and baseline's metrics averaged over the held-out-class protocols."""
    held = [r for name, r in results.items() if name.startswith("mnist-no")]
    if not held:
        return {}
    rows = {**{k: [r["kinds"][k] for r in held] for k in held[0]["kinds"]},
            **{f"{b} (no model)": [r["baselines"][b] for r in held] for b in held[0]["baselines"]},
            **{f"{k} two-sided": [r["kinds"][k]["two_sided"] for r in held] for k in held[0]["kinds"]
               if "two_sided" in held[0]["kinds"][k]}}
    return {name: {m: float(np.mean([row[m] for row in rs])) for m in METRICS if m in rs[0]} for name, rs in rows.items()}


def format_tables(summary: Dict) -> str:
    """One table: a block of rows per protocol (every kind, its two-sided variant, every baseline) and the mean
    over the held-out classes."""
    labels = {"auroc": "AUROC", "auprc": "AUPRC", "fpr_at_95_tpr": "FPR95"}
    lines = [f"{'protocol':14s} {'score':26s} "
             + " ".join(f"{labels.get(m, m.replace('fpr_at_alpha_', 'FPR@')):>9s}" for m in METRICS)]
    blocks = [(name, _rows(r)) for name, r in summary["protocols"].items()]
    if summary["heldout_mean"]:
        blocks.append(("held-out mean", list(summary["heldout_mean"].items())))
    for protocol, rows in blocks:
        for name, m in rows:
            lines.append(f"{protocol:14s} {name:26s} " + " ".join(f"{m[k]:9.4f}" if k in m else " " * 9 for k in METRICS))
    return "\n".join(lines)


def _rows(result: Dict) -> List[Tuple[str, Dict]]:
    kinds = result["kinds"]
    return ([(k + (" (default)" if k == result["default"] else ""), m) for k, m in kinds.items()]
            + [(f"{k} two-sided", m["two_sided"]) for k, m in kinds.items() if "two_sided" in m]
            + [(f"{b} (no model)", m) for b, m in result["baselines"].items()])
