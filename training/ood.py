"""The out-of-distribution evaluation: how well each score kind separates normal from anomalous images.

Every score kind of the artifact (``training.calibration``) and every model-free baseline on one table: AUROC,
AUPRC, FPR at 95% TPR, and, with the artifact's own calibration, the false-positive rate at alpha on fresh
normal images. The evaluation loads the written artifact and calls its ``score``, so it measures what is served.
``python -m training ood`` is its command line; ``training.protocols`` runs it on whole protocols.
"""

import sys
import time
from dataclasses import replace
from typing import Dict, Iterator, Optional, Sequence, Tuple

import numpy as np

from training.calibration import (LatentFns, ScoreFn, artifact_combinations, artifact_latent, kind_scores,
                                  model_scores)
from training.data import load_dataset, to_8bit
from vae_artifact import complexity
from vae_artifact.calibration import Calibration
from vae_artifact.combination import Combination
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
                      latent: Optional[LatentFns] = None) -> Dict:
    """Every score kind and every model-free baseline on normal-test vs OOD-test uint8 images.

    Kinds: AUROC / AUPRC / FPR at 95% TPR, and with the artifact's calibration scores the false-positive rate
    on the (fresh) normal images and the detection rate on the OOD images at each level in ``ALPHAS``.
    Baselines ``size-<compressor>``: minus the compressed size alone (simpler = stranger, the direction that
    works for Fashion-MNIST -> MNIST; it is chosen knowing the OOD set, so it flatters the baseline).
    ``latent``: the artifact's latent methods (``artifact_latent``), which its ``-nn`` and ``density-`` kinds need.
    """
    k, levels = meta.scoring.k, meta.levels
    started = time.perf_counter()
    outs = [model_scores(score, x, k=k, noise_seed=meta.scoring.noise_seed, latent_dim=meta.latent_dim,
                         latent=latent) for x in (normal, ood)]
    model_s = time.perf_counter() - started
    combinations = artifact_combinations(meta.to_dict()["scoring"]["kinds"])
    (s_n, bits_n), (s_o, bits_o) = (kind_scores(o["nll"], x, levels, combinations=combinations, elbo=o["elbo"],
                                                latent=o) for o, x in zip(outs, (normal, ood)))
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
    variants = {}
    for kind, fitted in combinations.items():  # what the guards of a kind with guards do, on these images
        if kind not in s_n or all(t.counted == "whole" for t in fitted.terms):
            continue
        c = fitted.compressor
        for name, changed in guard_variants(kind, fitted).items():
            s_vn, s_vo = (changed.scores(o["nll"], o["elbo"], bits[c], o) for o, bits in zip(outs, (bits_n, bits_o)))
            variants[name] = detection_metrics(s_vn, s_vo)
    compress_us = {}
    for c in complexity.COMPRESSORS:  # the service's extra work per image for an nll-minus-<c> score
        started = time.perf_counter()
        complexity.compressed_bits(normal[:2000], c, levels)
        compress_us[c] = 1e6 * (time.perf_counter() - started) / len(normal[:2000])
    return {"k": k, "n_normal": len(normal), "n_ood": len(ood), "default": meta.scoring.default,
            "n_calib": meta.calibration.n if meta.calibration else 0, "kinds": kinds, "baselines": baselines,
            "variants": variants,
            "model_seconds": model_s, "images_per_s": (len(normal) + len(ood)) / model_s,
            "compress_us_per_image": compress_us,
            "mean_nll_nats": {"normal": float(outs[0]["nll"].mean()), "ood": float(outs[1]["nll"].mean())},
            "mean_se_nats": float(np.mean(outs[0]["se"]))}


def guard_variants(kind: str, fitted: Combination) -> Dict[str, Combination]:
    """A kind with guards, changed: every term counted whole (Fisher's method), and its whole terms alone."""
    whole = tuple(replace(t, counted="whole") for t in fitted.terms)
    main = tuple(t for t in fitted.terms if t.counted == "whole")
    return {f"{kind}, guards whole": replace(fitted, terms=whole),
            f"{kind}, no guards": replace(fitted, terms=main)}


def format_table(result: Dict) -> str:
    lines = [f"K={result['k']}  normal n={result['n_normal']}  OOD n={result['n_ood']}  calibration n="
             f"{result['n_calib']}  ({result['images_per_s']:.1f} images/s through score(); compression "
             + ", ".join(f"{c} {us:.0f} us" for c, us in result["compress_us_per_image"].items()) + " per image)",
             f"{'score':28s} {'AUROC':>7s} {'AUPRC':>7s} {'FPR95':>7s}"
             + "".join(f" {'FPR@' + str(a):>9s} {'TPR@' + str(a):>9s}" for a in ALPHAS)]
    rows = [(kind + (" (default)" if kind == result["default"] else ""), m) for kind, m in result["kinds"].items()]
    rows += [(f"{kind} two-sided", m["two_sided"]) for kind, m in result["kinds"].items() if "two_sided" in m]
    rows += [(f"{name} (no model)", m) for name, m in result["baselines"].items()]
    rows += list(result.get("variants", {}).items())
    for name, m in rows:
        line = f"{name:28s} {m['auroc']:7.4f} {m['auprc']:7.4f} {m['fpr_at_95_tpr']:7.4f}"
        for a in ALPHAS:
            if f"fpr_at_alpha_{a}" in m:
                line += f" {m[f'fpr_at_alpha_{a}']:9.4f} {m[f'tpr_at_alpha_{a}']:9.4f}"
        lines.append(line)
    return "\n".join(lines)


def test_sets(meta: Metadata, normal: str, ood: Optional[str] = None, holdout_class: Optional[int] = None,
              limit: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(normal, OOD) test images as the 8-bit images a client would send, in the model's shape: converted and
    resized as training converted its own data (an artifact trained with --image-size or --channels). The OOD
    images are ``ood``'s test split, or ``normal``'s test images of ``holdout_class``; the first ``limit`` of each."""
    image = meta.image
    shape = dict(channels=image.channels, image_size=image.height if image.height == image.width else None)
    ds = load_dataset(normal, seed=0, **shape)
    normal_images = to_8bit(ds.test.images, ds.levels)
    if holdout_class is not None:  # one source: its test images of class C are the OOD ones
        is_ood = ds.test.labels == holdout_class
        if not is_ood.any():
            raise SystemExit(f"no test images of class {holdout_class} in {normal}")
        normal_images, ood_images = normal_images[~is_ood], normal_images[is_ood]
    else:
        other = load_dataset(ood, seed=0, **shape)
        ood_images = to_8bit(other.test.images, other.levels)
        if ood_images.shape[1:] != normal_images.shape[1:]:
            raise SystemExit(f"--ood images are {ood_images.shape[1:]}, --normal images {normal_images.shape[1:]}")
    return (normal_images[:limit], ood_images[:limit]) if limit else (normal_images, ood_images)


def sweep_k(module, meta: Metadata, normal: np.ndarray, ood: np.ndarray, ks: Sequence[int], *, repeats: int,
            repeat_images: int) -> Iterator[Tuple[int, Dict]]:
    """The measurements behind DEFAULT_K, per K: the NLL estimate's real spread (per-image standard deviation over
    ``repeats`` noise seeds on the first ``repeat_images`` normal images), its delta-method SE and ESS, its mean (the
    bound tightens with K), the cost, and AUROC of ``nll`` and the default kind against the OOD set (noise seed 0,
    as served). Yields (K, row) as each K is done."""
    latent_dim, levels = meta.latent_dim, meta.levels
    combinations = artifact_combinations(meta.to_dict()["scoring"]["kinds"])
    latent = artifact_latent(module, meta)
    default = meta.scoring.default
    few = normal[:repeat_images]
    for k in ks:
        started, cpu_started = time.perf_counter(), time.process_time()  # CPU time: less at the mercy of a busy host
        out_n = model_scores(module.score, normal, k=k, noise_seed=0, latent_dim=latent_dim, latent=latent)
        ms = 1000 * (time.perf_counter() - started) / len(normal)
        cpu_ms = 1000 * (time.process_time() - cpu_started) / len(normal)
        out_o = model_scores(module.score, ood, k=k, noise_seed=0, latent_dim=latent_dim, latent=latent)
        reps = np.stack([model_scores(module.score, few, k=k, noise_seed=seed, latent_dim=latent_dim)["nll"]
                         for seed in range(repeats)])  # (R, n)
        # A combined kind keeps the references fitted at the artifact's K: an AUROC only, no p-values, at other K.
        s_n, s_o = (kind_scores(o["nll"], x, levels, combinations=combinations, elbo=o["elbo"],
                                latent=o)[0]
                    for o, x in ((out_n, normal), (out_o, ood)))
        yield k, {"nll": float(reps.mean()), "seed_sd": float(reps.std(axis=0, ddof=1).mean()),
                  "se_mean": float(np.mean(out_n["se"])) if k > 1 else None, "ess": float(out_n["ess"].mean()),
                  "ms_per_image": ms, "cpu_ms_per_image": cpu_ms,
                  "auroc_nll": detection_metrics(s_n["nll"], s_o["nll"])["auroc"],
                  "auroc_default": detection_metrics(s_n[default], s_o[default])["auroc"]}


if __name__ == "__main__":
    from training.aliases import forward

    forward("training.ood", ["ood"], sys.argv[1:])
