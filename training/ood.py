"""The out-of-distribution evaluation: how well each score kind separates normal from anomalous images.

Every score kind of the artifact (``training.calibration``) and every model-free baseline on one table: AUROC,
AUPRC, FPR at 95% TPR, and, with the artifact's own calibration, the false-positive rate at alpha on fresh
normal images. The evaluation loads the written artifact and calls its ``score``, so it measures what is served.

    python -m training.ood evaluate --model runs/fashion/vae.ts --normal idx:DATA/fashion-mnist --ood idx:DATA/mnist
    python -m training.evaluate ood   # both protocols, every kind and baseline in one table (training.ood_protocols)
    python -m training.ood evaluate --model runs/mnist-no3/vae.ts --normal idx:DATA/mnist --holdout-class 3
    python -m training.ood calibrate --model M.ts   # recompute the calibration from the recorded calib split
    python -m training.ood calibrate --model OLD.ts --assume-training-defaults   # artifacts before the data recipe
    python -m training.ood sweep-k --model runs/fashion/vae.ts --normal idx:... --ood idx:...  # SE and cost vs K
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from training.calibration import (NeighboursFn, ScoreFn, artifact_combinations, artifact_neighbours, kind_scores,
                                  model_scores, recalibrate)
from training.data import load_dataset, to_8bit
from vae_artifact import complexity
from vae_artifact.calibration import Calibration
from vae_artifact.io import load_artifact
from vae_artifact.metadata import Metadata

ALPHAS = (0.01, 0.05)


def detection_metrics(normal: np.ndarray, ood: np.ndarray) -> Dict[str, float]:
    """AUROC, AUPRC (OOD = positive class) and the FPR on normal data at 95% TPR on OOD data."""
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    y = np.r_[np.zeros(len(normal)), np.ones(len(ood))]
    s = np.r_[normal, ood]
    fpr, tpr, _ = roc_curve(y, s)
    return {"auroc": float(roc_auc_score(y, s)), "auprc": float(average_precision_score(y, s)),
            "fpr_at_95_tpr": float(fpr[np.searchsorted(tpr, 0.95, side="left")])}


def evaluate_artifact(score: ScoreFn, meta: Metadata, normal: np.ndarray, ood: np.ndarray,
                      neighbours: Optional[NeighboursFn] = None) -> Dict:
    """Every score kind and every model-free baseline on normal-test vs OOD-test uint8 images.

    Kinds: AUROC / AUPRC / FPR at 95% TPR, and with the artifact's calibration scores the false-positive rate
    on the (fresh) normal images and the detection rate on the OOD images at each level in ``ALPHAS``.
    Baselines ``size-<compressor>``: minus the compressed size alone (simpler = stranger, the direction that
    works for Fashion-MNIST -> MNIST; it is chosen knowing the OOD set, so it flatters the baseline).
    ``neighbours``: the artifact's ``latent_neighbour_distance``, which its ``-nn`` kinds need.
    """
    k, levels = meta.scoring.k, meta.levels
    started = time.perf_counter()
    outs = [model_scores(score, x, k=k, noise_seed=meta.scoring.noise_seed, latent_dim=meta.latent_dim,
                         neighbours=neighbours) for x in (normal, ood)]
    model_s = time.perf_counter() - started
    combinations = artifact_combinations(meta.to_dict()["scoring"]["kinds"])
    (s_n, bits_n), (s_o, bits_o) = (kind_scores(o["nll"], x, levels, combinations=combinations, elbo=o["elbo"],
                                                latent_nn=o.get("latent_nn")) for o, x in zip(outs, (normal, ood)))
    kinds: Dict[str, Dict] = {}
    for kind in s_n:
        row = detection_metrics(s_n[kind], s_o[kind])
        cal = Calibration.from_metadata(meta, kind)
        if cal is not None:
            p_n, p_o = cal.p_values(s_n[kind]), cal.p_values(s_o[kind])
            for alpha in ALPHAS:
                row[f"fpr_at_alpha_{alpha}"] = float(np.mean(p_n <= alpha))
                row[f"tpr_at_alpha_{alpha}"] = float(np.mean(p_o <= alpha))
            row["two_sided"] = detection_metrics(-cal.p_values(s_n[kind], "two-sided"),
                                                 -cal.p_values(s_o[kind], "two-sided"))
        kinds[kind] = row
    baselines = {f"size-{c}": detection_metrics(-bits_n[c], -bits_o[c]) for c in bits_n}
    compress_us = {}
    for c in complexity.COMPRESSORS:  # the service's extra work per image for an nll-minus-<c> score
        started = time.perf_counter()
        complexity.compressed_bits(normal[:2000], c, levels)
        compress_us[c] = 1e6 * (time.perf_counter() - started) / len(normal[:2000])
    return {"k": k, "n_normal": len(normal), "n_ood": len(ood), "default": meta.scoring.default,
            "n_calib": meta.calibration.n if meta.calibration else 0, "kinds": kinds, "baselines": baselines,
            "model_seconds": model_s, "images_per_s": (len(normal) + len(ood)) / model_s,
            "compress_us_per_image": compress_us,
            "mean_nll_nats": {"normal": float(outs[0]["nll"].mean()), "ood": float(outs[1]["nll"].mean())},
            "mean_se_nats": float(np.mean(outs[0]["se"]))}


def format_table(result: Dict) -> str:
    lines = [f"K={result['k']}  normal n={result['n_normal']}  OOD n={result['n_ood']}  calibration n="
             f"{result['n_calib']}  ({result['images_per_s']:.1f} images/s through score(); compression "
             + ", ".join(f"{c} {us:.0f} us" for c, us in result["compress_us_per_image"].items()) + " per image)",
             f"{'score':28s} {'AUROC':>7s} {'AUPRC':>7s} {'FPR95':>7s}"
             + "".join(f" {'FPR@' + str(a):>9s} {'TPR@' + str(a):>9s}" for a in ALPHAS)]
    rows = [(kind + (" (default)" if kind == result["default"] else ""), m) for kind, m in result["kinds"].items()]
    rows += [(f"{kind} two-sided", m["two_sided"]) for kind, m in result["kinds"].items() if "two_sided" in m]
    rows += [(f"{name} (no model)", m) for name, m in result["baselines"].items()]
    for name, m in rows:
        line = f"{name:28s} {m['auroc']:7.4f} {m['auprc']:7.4f} {m['fpr_at_95_tpr']:7.4f}"
        for a in ALPHAS:
            if f"fpr_at_alpha_{a}" in m:
                line += f" {m[f'fpr_at_alpha_{a}']:9.4f} {m[f'tpr_at_alpha_{a}']:9.4f}"
        lines.append(line)
    return "\n".join(lines)


def _test_sets(args: argparse.Namespace, meta: Metadata) -> Tuple[np.ndarray, np.ndarray]:
    """(normal, OOD) test images as the 8-bit images a client would send, in the model's shape: converted and
    resized as training converted its own data (an artifact trained with --image-size or --channels)."""
    image = meta.image
    shape = dict(channels=image.channels, image_size=image.height if image.height == image.width else None)
    ds = load_dataset(args.normal, seed=0, **shape)
    normal = to_8bit(ds.test.images, ds.levels)
    if args.holdout_class is not None:  # one source: its test images of class C are the OOD ones
        is_ood = ds.test.labels == args.holdout_class
        if not is_ood.any():
            raise SystemExit(f"no test images of class {args.holdout_class} in {args.normal}")
        normal, ood = normal[~is_ood], normal[is_ood]
    else:
        other = load_dataset(args.ood, seed=0, **shape)
        ood = to_8bit(other.test.images, other.levels)
        if ood.shape[1:] != normal.shape[1:]:
            raise SystemExit(f"--ood images are {ood.shape[1:]}, --normal images {normal.shape[1:]}")
    return (normal[: args.limit], ood[: args.limit]) if args.limit else (normal, ood)


def cmd_evaluate(args: argparse.Namespace) -> Dict:
    module, meta = load_artifact(args.model)
    classes = (meta.document.get("data") or {}).get("classes")
    if args.holdout_class is not None and classes is not None and args.holdout_class in classes:
        print(f"warning: {args.model} was trained on class {args.holdout_class}", file=sys.stderr)
    normal, ood = _test_sets(args, meta)
    result = evaluate_artifact(module.score, meta, normal, ood, artifact_neighbours(module, meta))
    result.update(model=str(args.model), normal=args.normal, ood=args.ood, holdout_class=args.holdout_class)
    print(format_table(result))
    return result


def cmd_calibrate(args: argparse.Namespace) -> Dict:
    """Recompute every kind's calibration of an artifact from its own calib split and rewrite its metadata."""
    calibration = recalibrate(args.model, out=args.out, data=args.data, k=args.k,
                              assume_defaults=args.assume_training_defaults, latent_bank=args.latent_bank)
    print(f"{args.out or args.model}: calibrated {list(calibration['scores'])} on n={calibration['n']} "
          f"with K={calibration['k']}")
    return calibration


def cmd_sweep_k(args: argparse.Namespace) -> Dict:
    """The measurements behind DEFAULT_K, per K: the NLL estimate's real spread (per-image standard deviation
    over ``--repeats`` noise seeds), its delta-method SE and ESS, its mean (the bound tightens with K), the
    cost, and AUROC of ``nll`` and the default kind against the OOD set (noise seed 0, as served)."""
    module, meta = load_artifact(args.model)
    normal, ood = _test_sets(args, meta)
    latent_dim, levels = meta.latent_dim, meta.levels
    combinations = artifact_combinations(meta.to_dict()["scoring"]["kinds"])
    neighbours = artifact_neighbours(module, meta)
    default = meta.scoring.default
    few = normal[: args.repeat_images]
    rows = {}
    print(f"{'K':>5s} {'NLL':>9s} {'seed sd':>8s} {'SE mean':>8s} {'ESS':>6s} {'ms/img':>7s} {'cpu ms':>7s} "
          f"{'AUROC nll':>9s} {'AUROC ' + default:>20s}")
    for k in args.ks:
        started, cpu_started = time.perf_counter(), time.process_time()  # CPU time: less at the mercy of a busy host
        out_n = model_scores(module.score, normal, k=k, noise_seed=0, latent_dim=latent_dim, neighbours=neighbours)
        ms = 1000 * (time.perf_counter() - started) / len(normal)
        cpu_ms = 1000 * (time.process_time() - cpu_started) / len(normal)
        out_o = model_scores(module.score, ood, k=k, noise_seed=0, latent_dim=latent_dim, neighbours=neighbours)
        reps = np.stack([model_scores(module.score, few, k=k, noise_seed=seed, latent_dim=latent_dim)["nll"]
                         for seed in range(args.repeats)])  # (R, n)
        # A combined kind keeps the references fitted at the artifact's K: an AUROC only, no p-values, at other K.
        s_n, s_o = (kind_scores(o["nll"], x, levels, combinations=combinations, elbo=o["elbo"],
                                latent_nn=o.get("latent_nn"))[0]
                    for o, x in ((out_n, normal), (out_o, ood)))
        rows[k] = {"nll": float(reps.mean()), "seed_sd": float(reps.std(axis=0, ddof=1).mean()),
                   "se_mean": float(np.mean(out_n["se"])) if k > 1 else None, "ess": float(out_n["ess"].mean()),
                   "ms_per_image": ms, "cpu_ms_per_image": cpu_ms,
                   "auroc_nll": detection_metrics(s_n["nll"], s_o["nll"])["auroc"],
                   "auroc_default": detection_metrics(s_n[default], s_o[default])["auroc"]}
        r = rows[k]
        print(f"{k:5d} {r['nll']:9.2f} {r['seed_sd']:8.3f} {r['se_mean'] or math.nan:8.3f} {r['ess']:6.2f} "
              f"{ms:7.2f} {cpu_ms:7.2f} {r['auroc_nll']:9.4f} {r['auroc_default']:20.4f}", flush=True)
    return {"model": str(args.model), "n_normal": len(normal), "n_ood": len(ood), "repeats": args.repeats,
            "repeat_images": len(few), "threads": torch.get_num_threads(), "rows": rows}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.ood", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("evaluate", "AUROC / AUPRC / FPR95 and FPR at alpha for every score kind and baseline"),
                        ("sweep-k", "NLL standard error, ESS, cost and AUROC for several K")):
        c = sub.add_parser(name, help=help_, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        c.add_argument("--model", type=Path, required=True, help="artifact (vae.ts)")
        c.add_argument("--normal", required=True, help="data spec of the training distribution; its test split")
        group = c.add_mutually_exclusive_group(required=True)
        group.add_argument("--ood", help="data spec whose test split is out-of-distribution")
        group.add_argument("--holdout-class", type=int, help="the --normal test images of this class are the OOD ones")
        c.add_argument("--limit", type=int, default=None, help="first N images of each test set")
        c.add_argument("--json", type=Path, default=None, help="also write the results here")
        if name == "sweep-k":
            c.add_argument("--ks", type=lambda t: [int(v) for v in t.split(",")], default=[1, 4, 16, 32, 64, 128])
            c.add_argument("--repeats", type=int, default=4, help="noise seeds for the estimator's spread")
            c.add_argument("--repeat-images", type=int, default=100, help="normal images scored with every seed")
    c = sub.add_parser("calibrate", help="(re)compute every kind's calibration scores into an artifact")
    c.add_argument("--model", type=Path, required=True)
    c.add_argument("--data", default=None, help="the same data at another location (default: the artifact's "
                                                "data.name); refused unless it rebuilds the recorded calib split")
    c.add_argument("--assume-training-defaults", action="store_true",
                   help="for artifacts that predate the recorded data recipe: assume the training CLI's defaults "
                        "(--val-fraction, --image-size, --channels) for what the recipe lacks; the recorded split "
                        "sizes and image shape are still checked")
    c.add_argument("--k", type=int, default=None, help="importance samples (default: the artifact's scoring.k)")
    c.add_argument("--latent-bank", type=int, default=None, metavar="N",
                   help="an artifact without a latent bank: export it again with one of N training images (its "
                        "recorded train split; same weights), so that it offers the fisher-bz2-nn kind")
    c.add_argument("--out", type=Path, default=None, help="write here instead of rewriting --model in place")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    result = {"evaluate": cmd_evaluate, "sweep-k": cmd_sweep_k, "calibrate": cmd_calibrate}[args.command](args)
    print(f"wall time {time.perf_counter() - started:.1f}s ({torch.get_num_threads()} torch threads)")
    if getattr(args, "json", None):
        args.json.parent.mkdir(parents=True, exist_ok=True)
        result["wall_s"] = time.perf_counter() - started
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
