"""Anomaly score kinds, their calibration, and the out-of-distribution evaluation command.

Score kinds (every one in nats, higher = more anomalous; the artifact lists them in ``scoring.kinds``):

- ``nll``: -log p(x), the K-sample importance-weighted bound of the exported ``score`` method. Famously
  fooled by simple inputs: a Fashion-MNIST model finds MNIST digits *more* likely than its own test data.
- ``nll-minus-<compressor>``: -log p(x) - ln 2 * L(x), with L(x) the lossless compressed size of x in bits
  (Serrà et al. 2020, "Input complexity and out-of-distribution detection with likelihood-based generative
  models"). The compressor is a generic model of images, so the difference is a log-likelihood ratio: how
  much *worse* the VAE explains x than a model of "any image" does. Simple images stop looking typical.

Calibration (``calibration.scores[kind]``) holds every kind's scores of the held-out calib split, computed
exactly as the service computes them: 8-bit images, x = u / 255, the artifact's ``score`` with the fixed
noise ``randn((K, D), Generator('cpu').manual_seed(noise_seed))`` shared by every row, and the same
compressor. The evaluation loads the written artifact and calls its ``score``, so it measures what is served.

    python -m training.evaluate ood --model runs/fashion/vae.ts --normal idx:DATA/fashion-mnist --ood idx:DATA/mnist
    python -m training.ood evaluate --model runs/mnist-no3/vae.ts --normal idx:DATA/mnist --holdout-class 3
    python -m training.ood calibrate --model OLD.ts --data idx:DATA/fashion-mnist   # add the kinds to an old artifact
    python -m training.ood sweep-k --model runs/fashion/vae.ts --normal idx:... --ood idx:...  # SE and cost vs K
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from training import complexity
from training.data import load_dataset
from training.evaluate import scoring_noise
from training.export import METADATA_FILE, load_artifact, quiet_torchscript

# The default kind and K, chosen from the measurements in docs/anomaly.md (Fashion-MNIST -> MNIST).
DEFAULT_KIND = "nll-minus-bz2"
DEFAULT_K = 16
KINDS: Dict[str, Optional[str]] = {"nll": None, **{f"nll-minus-{c}": c for c in complexity.COMPRESSORS}}
ALPHAS = (0.01, 0.05)
REFERENCE = ("Serrà et al. 2020, Input complexity and out-of-distribution detection with likelihood-based "
             "generative models (ICLR)")
NOISE = "torch.randn((K, D), generator=torch.Generator('cpu').manual_seed(noise_seed)) on CPU, shared by every row"
MAX_ROWS = 2048  # images x K per call of score(): bounds memory for any K

ScoreFn = Callable[[Tensor, Tensor], Tuple[Tensor, ...]]


def describe_kind(kind: str) -> Dict:
    """The artifact's ``scoring.kinds[kind]``: formula, units, and the compressor's exact parameters."""
    compressor = KINDS[kind]
    if compressor is None:
        return {"formula": "-log p(x): K-sample importance-weighted bound", "units": "nats", "complexity": None}
    return {"formula": f"-log p(x) - ln(2) * L(x), L(x) = {compressor} size of x in bits", "units": "nats",
            "complexity": complexity.describe(compressor), "reference": REFERENCE}


def to_uint8(images: np.ndarray, levels: int) -> np.ndarray:
    """Images stored at ``levels`` values (0 .. levels-1) -> the 8-bit images a client would send."""
    if levels == 256:
        return images.astype(np.uint8, copy=False)
    return np.round(images.astype(np.float64) * (255.0 / (levels - 1))).astype(np.uint8)


@torch.inference_mode()
def model_scores(score: ScoreFn, images: np.ndarray, *, k: int, noise_seed: int, latent_dim: int,
                 device: torch.device = torch.device("cpu")) -> Dict[str, np.ndarray]:
    """uint8 (N, C, H, W) -> per image nll, elbo, rec, kl (nats), se (nats) and ess, float64, from
    ``score(x, eps)`` called as the service calls it: x = u / 255 and the fixed noise broadcast to (K, B, D)."""
    noise = scoring_noise(k, latent_dim, noise_seed).to(device)
    step = max(1, MAX_ROWS // k)
    parts: List[Tensor] = []
    for start in range(0, len(images), step):
        x = torch.from_numpy(images[start:start + step]).to(device).float().div_(255.0)
        iw, elbo, rec, kl, log_w = score(x, noise.unsqueeze(1).expand(k, x.shape[0], latent_dim))  # (K,D)->(K,B,D)
        # The service's statistics of the K weights: delta-method SE of the NLL and the effective sample size.
        w = torch.exp(log_w.double() - log_w.double().max(dim=0).values)  # (K, B), scale-free
        se = w.std(dim=0) / (math.sqrt(k) * w.mean(dim=0)) if k > 1 else torch.full_like(iw, math.nan).double()
        ess = w.sum(dim=0) ** 2 / (w**2).sum(dim=0)
        parts.append(torch.stack([-iw.double(), elbo.double(), rec.double(), kl.double(), se, ess], dim=1).cpu())
    out = torch.cat(parts).numpy() if parts else np.zeros((0, 6))
    return {name: out[:, i] for i, name in enumerate(("nll", "elbo", "rec", "kl", "se", "ess"))}


def kind_scores(nll: np.ndarray, images: np.ndarray, levels: int,
                kinds: Sequence[str] = tuple(KINDS)) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """({kind: score (N,)}, {compressor: bits (N,)}) for the images whose NLLs (nats) are ``nll``."""
    bits = {c: complexity.compressed_bits(images, c, levels) for c in {KINDS[k] for k in kinds} - {None}}
    scores = {kind: nll if KINDS[kind] is None else nll - math.log(2.0) * bits[KINDS[kind]] for kind in kinds}
    return scores, bits


def calibration_sections(score: ScoreFn, calib_images: np.ndarray, *, k: int, noise_seed: int, latent_dim: int,
                         levels: int, device: torch.device = torch.device("cpu")) -> Tuple[Dict, Dict]:
    """The artifact's ``scoring`` and ``calibration`` sections from the calib split (uint8, as served)."""
    nll = model_scores(score, calib_images, k=k, noise_seed=noise_seed, latent_dim=latent_dim, device=device)["nll"]
    scores, _ = kind_scores(nll, calib_images, levels)
    scoring = {"k": k, "noise_seed": noise_seed, "noise": NOISE, "default": DEFAULT_KIND,
               "kinds": {kind: describe_kind(kind) for kind in KINDS}}
    calibration = {"split": "calib", "n": len(calib_images), "k": k,
                   "scores": {kind: sorted(float(v) for v in s) for kind, s in scores.items()}}
    return scoring, calibration


def conformal_p_values(calib: np.ndarray, s: np.ndarray) -> np.ndarray:
    """(1 + #{calib_i >= s}) / (n + 1): the service's upper-tail p-value, for the FPR check."""
    calib = np.sort(calib)
    return (1.0 + len(calib) - np.searchsorted(calib, s, side="left")) / (len(calib) + 1.0)


def detection_metrics(normal: np.ndarray, ood: np.ndarray) -> Dict[str, float]:
    """AUROC, AUPRC (OOD = positive class) and the FPR on normal data at 95% TPR on OOD data."""
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    y = np.r_[np.zeros(len(normal)), np.ones(len(ood))]
    s = np.r_[normal, ood]
    fpr, tpr, _ = roc_curve(y, s)
    return {"auroc": float(roc_auc_score(y, s)), "auprc": float(average_precision_score(y, s)),
            "fpr_at_95_tpr": float(fpr[np.searchsorted(tpr, 0.95, side="left")])}


def two_sided_p_values(calib: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The service's typicality p-value: min(1, 2 min(upper, lower)) flags too-likely inputs as well."""
    calib = np.sort(calib)
    lower = (1.0 + np.searchsorted(calib, s, side="right")) / (len(calib) + 1.0)  # #{calib_i <= s}
    return np.minimum(1.0, 2.0 * np.minimum(conformal_p_values(calib, s), lower))


def evaluate_artifact(score: ScoreFn, meta: Dict, normal: np.ndarray, ood: np.ndarray) -> Dict:
    """Every score kind and every model-free baseline on normal-test vs OOD-test uint8 images.

    Kinds: AUROC / AUPRC / FPR at 95% TPR, and with the artifact's calibration scores the false-positive rate
    on the (fresh) normal images and the detection rate on the OOD images at each level in ``ALPHAS``.
    Baselines ``size-<compressor>``: minus the compressed size alone (simpler = stranger, the direction that
    works for Fashion-MNIST -> MNIST; it is chosen knowing the OOD set, so it flatters the baseline).
    """
    scoring, levels = meta["scoring"], int(meta["pixels"]["levels"])
    k, latent_dim = int(scoring["k"]), int(meta["model"]["latent_dim"])
    calib = (meta.get("calibration") or {}).get("scores") or {}
    started = time.perf_counter()
    outs = [model_scores(score, x, k=k, noise_seed=int(scoring.get("noise_seed", 0)), latent_dim=latent_dim)
            for x in (normal, ood)]
    model_s = time.perf_counter() - started
    (s_n, bits_n), (s_o, bits_o) = (kind_scores(o["nll"], x, levels) for o, x in zip(outs, (normal, ood)))
    kinds: Dict[str, Dict] = {}
    for kind in KINDS:
        row = detection_metrics(s_n[kind], s_o[kind])
        if kind in calib:
            cal = np.asarray(calib[kind], dtype=np.float64)
            p_n, p_o = conformal_p_values(cal, s_n[kind]), conformal_p_values(cal, s_o[kind])
            for alpha in ALPHAS:
                row[f"fpr_at_alpha_{alpha}"] = float(np.mean(p_n <= alpha))
                row[f"tpr_at_alpha_{alpha}"] = float(np.mean(p_o <= alpha))
            two = detection_metrics(-two_sided_p_values(cal, s_n[kind]), -two_sided_p_values(cal, s_o[kind]))
            row["two_sided"] = two
        kinds[kind] = row
    baselines = {f"size-{c}": detection_metrics(-bits_n[c], -bits_o[c]) for c in bits_n}
    compress_us = {}
    for c in complexity.COMPRESSORS:  # the service's extra work per image for an nll-minus-<c> score
        started = time.perf_counter()
        complexity.compressed_bits(normal[:2000], c, levels)
        compress_us[c] = 1e6 * (time.perf_counter() - started) / len(normal[:2000])
    return {"k": k, "n_normal": len(normal), "n_ood": len(ood), "default": scoring.get("default", "nll"),
            "n_calib": int((meta.get("calibration") or {}).get("n", 0)), "kinds": kinds, "baselines": baselines,
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


def _test_sets(args: argparse.Namespace) -> Tuple[np.ndarray, np.ndarray]:
    """(normal, OOD) test images as the 8-bit images a client would send."""

    ds = load_dataset(args.normal, seed=0)
    normal = to_uint8(ds.test.images, ds.levels)
    if args.holdout_class is not None:  # one source: its test images of class C are the OOD ones
        is_ood = ds.test.labels == args.holdout_class
        if not is_ood.any():
            raise SystemExit(f"no test images of class {args.holdout_class} in {args.normal}")
        normal, ood = normal[~is_ood], normal[is_ood]
    else:
        other = load_dataset(args.ood, seed=0)
        ood = to_uint8(other.test.images, other.levels)
        if ood.shape[1:] != normal.shape[1:]:
            raise SystemExit(f"--ood images are {ood.shape[1:]}, --normal images {normal.shape[1:]}")
    return (normal[: args.limit], ood[: args.limit]) if args.limit else (normal, ood)


def cmd_evaluate(args: argparse.Namespace) -> Dict:
    module, meta = load_artifact(args.model)
    classes = (meta.get("data") or {}).get("classes")
    if args.holdout_class is not None and classes is not None and args.holdout_class in classes:
        print(f"warning: {args.model} was trained on class {args.holdout_class}", file=sys.stderr)
    normal, ood = _test_sets(args)
    result = evaluate_artifact(module.score, meta, normal, ood)
    result.update(model=str(args.model), normal=args.normal, ood=args.ood, holdout_class=args.holdout_class)
    print(format_table(result))
    return result


def cmd_calibrate(args: argparse.Namespace) -> Dict:
    """Recompute every kind's calibration of an artifact from its own calib split and rewrite its metadata."""
    from training import trainer
    from training.__main__ import BINARIZE_SEED  # the CLI imports this module: import it only here

    module, meta = load_artifact(args.model)
    data = meta.get("data") or {}
    ds = load_dataset(args.data or data["name"], classes=data.get("classes"), seed=int(data.get("split_seed", 0)))
    calib, levels = ds.calib, ds.levels
    if data.get("binarize"):
        calib, levels = trainer.binarize_once(ds.calib, ds.levels, BINARIZE_SEED + 1), 2  # as python -m training
    if len(calib) != data.get("n_calib", len(calib)):
        raise SystemExit(f"calib split has {len(calib)} images, the artifact was calibrated on {data['n_calib']}")
    k = args.k or int(meta.get("scoring", {}).get("k", DEFAULT_K))
    scoring, calibration = calibration_sections(
        module.score, to_uint8(calib.images, levels), k=k, noise_seed=int(meta.get("scoring", {}).get("noise_seed", 0)),
        latent_dim=int(meta["model"]["latent_dim"]), levels=int(meta["pixels"]["levels"]))
    meta = dict(meta, scoring=scoring, calibration=calibration)
    out = args.out or args.model
    tmp = Path(str(out) + ".tmp")
    with quiet_torchscript():
        torch.jit.save(module, str(tmp), _extra_files={METADATA_FILE: json.dumps(meta, indent=1, allow_nan=False)})
    os.replace(tmp, out)
    load_artifact(out)  # fails loudly if the rewritten artifact does not read back
    print(f"{out}: calibrated {list(calibration['scores'])} on n={calibration['n']} with K={k}")
    return calibration


def cmd_sweep_k(args: argparse.Namespace) -> Dict:
    """The measurements behind DEFAULT_K, per K: the NLL estimate's real spread (per-image standard deviation
    over ``--repeats`` noise seeds), its delta-method SE and ESS, its mean (the bound tightens with K), the
    cost, and AUROC of ``nll`` and the default kind against the OOD set (noise seed 0, as served)."""
    module, meta = load_artifact(args.model)
    normal, ood = _test_sets(args)
    latent_dim, levels = int(meta["model"]["latent_dim"]), int(meta["pixels"]["levels"])
    few = normal[: args.repeat_images]
    rows = {}
    print(f"{'K':>5s} {'NLL':>9s} {'seed sd':>8s} {'SE mean':>8s} {'ESS':>6s} {'ms/img':>7s} {'cpu ms':>7s} "
          f"{'AUROC nll':>9s} {'AUROC ' + DEFAULT_KIND:>20s}")
    for k in args.ks:
        started, cpu_started = time.perf_counter(), time.process_time()  # CPU time: less at the mercy of a busy host
        out_n = model_scores(module.score, normal, k=k, noise_seed=0, latent_dim=latent_dim)
        ms = 1000 * (time.perf_counter() - started) / len(normal)
        cpu_ms = 1000 * (time.process_time() - cpu_started) / len(normal)
        out_o = model_scores(module.score, ood, k=k, noise_seed=0, latent_dim=latent_dim)
        reps = np.stack([model_scores(module.score, few, k=k, noise_seed=seed, latent_dim=latent_dim)["nll"]
                         for seed in range(args.repeats)])  # (R, n)
        s_n, s_o = kind_scores(out_n["nll"], normal, levels)[0], kind_scores(out_o["nll"], ood, levels)[0]
        rows[k] = {"nll": float(reps.mean()), "seed_sd": float(reps.std(axis=0, ddof=1).mean()),
                   "se_mean": float(np.mean(out_n["se"])) if k > 1 else None, "ess": float(out_n["ess"].mean()),
                   "ms_per_image": ms, "cpu_ms_per_image": cpu_ms,
                   "auroc_nll": detection_metrics(s_n["nll"], s_o["nll"])["auroc"],
                   "auroc_default": detection_metrics(s_n[DEFAULT_KIND], s_o[DEFAULT_KIND])["auroc"]}
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
    c.add_argument("--data", default=None, help="data spec (default: the artifact's data.name)")
    c.add_argument("--k", type=int, default=None, help="importance samples (default: the artifact's scoring.k)")
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
