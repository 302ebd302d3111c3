"""The training report next to the artifact: report.json and a few PNG figures.

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas directly: no pyplot global state, no
backend switch at import, nothing imported before ``write_report`` runs.
"""

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np
import torch
from torch import Tensor

from training.model import VAE

log = logging.getLogger(__name__)

REPORT_FILE = "report.json"
FIGURES = ("loss_curves.png", "reconstructions.png", "samples.png", "latents.png", "scores.png", "edits.png")
EDIT_STRENGTHS = (-2.0, -1.0, 0.0, 1.0, 2.0)  # the service's default strengths for /edit (raw latent units)


def report_document(metadata: Dict[str, Any], history: List[Dict[str, float]]) -> Dict[str, Any]:
    """The metadata without the (long) list of calibration scores, plus the per-epoch history."""
    doc = json.loads(json.dumps(metadata))  # a deep copy that is certainly JSON-able
    calibration = doc.get("calibration", {})
    scores = calibration.pop("scores", {})
    calibration["summary"] = {name: _summary(values) for name, values in scores.items()}
    doc["history"] = history
    return doc


def write_report(out_dir: Path, metadata: Dict[str, Any], history: List[Dict[str, float]], *, vae: VAE,
                 test_x: Tensor, test_labels: np.ndarray, test_mu: Tensor, calib_scores: Sequence[float],
                 test_scores: Sequence[float], seed: int = 0) -> List[Path]:
    """Write report.json and the figures into ``out_dir``; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / REPORT_FILE
    path.write_text(json.dumps(report_document(metadata, history), indent=1, allow_nan=False))
    written = [path]
    vae = vae.eval().cpu()
    with torch.inference_mode():
        x = vae.quantize(test_x[:32])
        recon = vae.decode(vae.encode(x)[0])  # decode the posterior mean: the model's best reconstruction
        samples = vae.decode(vae.sample_latents(64, torch.Generator().manual_seed(seed)))
    title = metadata.get("data", {}).get("name", "")
    figures = {
        "loss_curves.png": _loss_curves(history),
        "reconstructions.png": _grid_figure([x, recon], ["input", "reconstruction"], title),
        "samples.png": _grid_figure([samples], ["samples from the prior (pixel means)"], title),
        "latents.png": _latents(test_mu.numpy(), np.asarray(test_labels)),
        "scores.png": _score_histogram(calib_scores, test_scores, metadata.get("scoring", {}).get("k")),
    }
    if (metadata.get("directions") or {}).get("items"):
        figures["edits.png"] = _edits(vae, x[:6], metadata["directions"]["items"], title)
    for name, fig in figures.items():
        fig.savefig(out_dir / name, dpi=100)
        written.append(out_dir / name)
    log.info("report written to %s", out_dir)
    return written


def _summary(values: Sequence[float]) -> Dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    q = np.quantile(v, [0.05, 0.5, 0.95, 0.99]) if len(v) else [float("nan")] * 4
    return {"n": int(len(v)), "mean": float(v.mean()), "p05": float(q[0]), "p50": float(q[1]), "p95": float(q[2]),
            "p99": float(q[3])}


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _loss_curves(history: List[Dict[str, float]]):
    fig = _figure(12, 3.5)
    epochs = [row["epoch"] for row in history]
    panels = [("loss", "loss (nats/image; val = -ELBO)"), ("rec", "reconstruction log p(x|z)"), ("kl", "KL(q||p)")]
    for ax, (key, label) in zip(fig.subplots(1, 3), panels):
        ax.plot(epochs, [row[f"train_{key}"] for row in history], label="train")
        ax.plot(epochs, [row[f"val_{key}"] for row in history], label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(label)
        ax.legend()
    return fig


def _tile(images: Tensor, columns: int = 8) -> np.ndarray:
    """(N, C, H, W) in [0, 1] -> one (rows*H, columns*W[, 3]) image with 1-pixel gaps."""
    x = images.detach().float().clamp(0, 1).cpu().numpy()
    n, c, h, w = x.shape
    rows = -(-n // columns)
    grid = np.ones((c, rows * (h + 1) - 1, columns * (w + 1) - 1), dtype=np.float32)
    for i in range(n):
        r, col = divmod(i, columns)
        grid[:, r * (h + 1) : r * (h + 1) + h, col * (w + 1) : col * (w + 1) + w] = x[i]
    return grid[0] if c == 1 else grid.transpose(1, 2, 0)


def _grid_figure(groups: List[Tensor], labels: List[str], title: str):
    tiles = [_tile(images) for images in groups]
    fig = _figure(4.5 * len(groups), 4.5 * tiles[0].shape[0] / tiles[0].shape[1] + 0.6)
    axes = np.atleast_1d(fig.subplots(1, len(groups)))
    for ax, tile, label in zip(axes, tiles, labels):
        ax.imshow(tile, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{label}\n{title}" if title else label, fontsize=9)
        ax.axis("off")
    return fig


@torch.inference_mode()
def _edits(vae: VAE, x: Tensor, items: List[Dict[str, Any]], title: str):
    """Attribute edits: per direction (the two pixel ones with the best held-out AUROC, then the first others),
    rows = inputs, columns = strengths, each image decoded from z' = mu + strength * vector."""
    pixel = sorted((d for d in items if d["kind"] == "pixel"), key=lambda d: -(d.get("auroc") or 0.0))[:2]
    chosen = [d for d in items if d in pixel] + [d for d in items if d not in pixel][: 4 - len(pixel)]
    mu = vae.encode(x)[0]
    strengths = torch.tensor(EDIT_STRENGTHS)
    fig = _figure(2.6 * len(chosen), 2.6 * len(x) / len(strengths) + 0.9)
    for ax, direction in zip(np.atleast_1d(fig.subplots(1, len(chosen))), chosen):
        v = torch.tensor(direction["vector"], dtype=mu.dtype)
        z = mu[:, None, :] + strengths[None, :, None] * v  # (N, S, D)
        images = vae.decode(z.reshape(-1, z.shape[-1]))  # (N * S, C, H, W), row by row
        ax.imshow(_tile(images, columns=len(strengths)), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        auroc = direction.get("auroc")
        ax.set_title(f"{direction['name']} (AUROC {auroc:.2f})" if auroc is not None else direction["name"],
                     fontsize=9)
        ax.set_xlabel("strength " + "  ".join(f"{s:+g}" for s in EDIT_STRENGTHS), fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"z' = mu + strength * v{': ' + title if title else ''}", fontsize=9)
    return fig


def _latents(mu: np.ndarray, labels: np.ndarray):
    fig = _figure(5.5, 5)
    ax = fig.subplots()
    if mu.shape[1] > 2:
        from sklearn.decomposition import PCA

        xy = PCA(n_components=2, random_state=0).fit_transform(mu)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.set_title(f"test posterior means (PCA of {mu.shape[1]} dims)")
    else:
        xy = np.pad(mu, ((0, 0), (0, 2 - mu.shape[1])))
        ax.set_xlabel("z1")
        ax.set_ylabel("z2")
        ax.set_title("test posterior means")
    if (labels >= 0).any():
        points = ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap="tab10", s=6, vmin=-0.5, vmax=9.5)
        fig.colorbar(points, ax=ax, label="label")
    else:
        ax.scatter(xy[:, 0], xy[:, 1], s=6)
    return fig


def _score_histogram(calib: Sequence[float], test: Sequence[float], k):
    fig = _figure(6, 4)
    ax = fig.subplots()
    both = np.concatenate([np.asarray(calib, float), np.asarray(test, float)])
    bins = np.linspace(both.min(), both.max(), 50) if len(both) else 10
    ax.hist(test, bins=bins, alpha=0.6, density=True, label=f"test (n={len(test)})")
    ax.hist(calib, bins=bins, alpha=0.6, density=True, label=f"calibration (n={len(calib)})")
    ax.set_xlabel(f"anomaly score = -log p(x) (IW, K={k}), nats")
    ax.set_ylabel("density")
    ax.legend()
    return fig
