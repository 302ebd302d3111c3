"""One training run, stage by stage: data -> model -> train -> evaluate -> latent bank and density -> calibration
-> directions -> metadata -> export -> report.

``run(options, ctx)`` is what ``python -m training train`` does after parsing its arguments; each stage is a
function of what it uses, so a stage can be read, tested or rerun on its own.
"""

import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
from tqdm import tqdm

from training import calibration, density, directions, distributed, evaluate, export, trainer
from training.data import Dataset, Split, held_out_splits, to_8bit, to_float
from training.model import VAE, VAEConfig, num_parameters
from training.recipe import DataRecipe, data_section

log = logging.getLogger("training")

REPORT_TEST_SCORES = 2000  # test images scored for the report's histogram: enough for its shape, bounded cost


@dataclass(frozen=True)
class ModelOptions:
    """The model's choices that do not come from the data (its shape and pixel levels do)."""

    latent_dim: int = VAEConfig.latent_dim
    base_width: int = VAEConfig.base_width
    arch: str = "auto"  # auto: lean for images of 16x16 and up, full below (``architecture``)
    mixture: int = VAEConfig.mixture
    prior: str = "standard"
    pseudo_inputs: int = 0


@dataclass(frozen=True)
class RunOptions:
    recipe: DataRecipe
    model: ModelOptions
    train: trainer.TrainConfig
    out: Path
    eval_k: int
    eval_n: int  # 0: the whole test split
    score_k: int
    latent_bank: int  # 0: no bank
    latent_density: bool = True
    device: str = "auto"
    resume: Optional[Path] = None
    report: bool = True
    quiet: bool = False


def architecture(choice: str, height: int, width: int) -> str:
    """--arch auto: lean for images of 16x16 and up, where the full-resolution layers cost most; full below
    (an 8x8 image has one stride-2 step, and the lean layout would leave it a single convolution)."""
    if choice != "auto":
        return choice
    return "lean" if min(height, width) >= 16 and height % 2 == 0 and width % 2 == 0 else "full"


def run(options: RunOptions, ctx: distributed.DistContext) -> Optional[Dict]:
    """The whole run; returns the artifact's metadata on rank 0, None elsewhere."""
    progress = not options.quiet and sys.stderr.isatty()
    ds = load_data(options.recipe)
    val, test, eval_levels = held_out_splits(ds, options.recipe.binarize)
    resume = trainer.load_checkpoint(options.resume) if options.resume else None
    warn_changed_settings(options.train, resume)
    vae = build_model(options, ds, resume)
    result = trainer.train(vae, ds.train, val, ds.levels, options.train, ctx, val_levels=eval_levels,
                           checkpoint_path=options.out.with_suffix(".ckpt"), resume=resume, progress=progress)
    distributed.cleanup(ctx, together=True)
    if not ctx.is_main:
        return None

    device = ctx.device
    test_x = to_float(test.images, eval_levels)
    metrics = evaluate.test_metrics(vae, test_x, device, k=options.eval_k, seed=options.train.seed,
                                    n=options.eval_n, progress=progress)
    bank = (export.latent_bank(vae, ds.train, ds.levels, options.latent_bank, seed=options.train.seed)
            if options.latent_bank else None)
    fitted = (density.fit_split(export.ServingModule(vae.eval()).encode, ds.train, ds.levels, device,
                                seed=options.train.seed) if options.latent_density else None)
    serving = export.ServingModule(vae.eval(), bank, fitted).to(device)
    scoring, calibrated = calibrate(serving, ds, options.score_k, vae.config, device, progress)
    latent_directions = attribute_directions(serving, ds, device)
    sections = dict(latent_density=fitted.summary) if fitted is not None else {}
    meta = export.build_metadata(serving, data=data_section(options.recipe, ds),
                                 training=training_section(options.train, result, ctx), evaluation=metrics,
                                 scoring=scoring, calibration=calibrated, directions=latent_directions, **sections)
    meta = export.export_artifact(serving, options.out, meta, check_x=test_x[:8])
    if options.report:
        write_report(options, meta, vae, ds, test, test_x, result.history, calibrated["scores"]["nll"], device)
    return meta


def load_data(recipe: DataRecipe) -> Dataset:
    try:
        return recipe.load()
    except (ValueError, FileNotFoundError) as exc:  # bad --data / options: a message, not a traceback
        raise SystemExit(f"python -m training: error: {exc}") from exc


def warn_changed_settings(config: trainer.TrainConfig, resume: Optional[Dict]) -> None:
    """A resumed run whose training settings differ from its checkpoint's says which. A setting added since the
    checkpoint was written ran at its default, which keeps the old behaviour; --epochs is how a run is extended."""
    if resume is None:
        return
    recorded = {**asdict(trainer.TrainConfig()), **resume["train_config"]}
    changed = {k: (recorded[k], v) for k, v in asdict(config).items() if recorded[k] != v and k != "epochs"}
    if changed:
        log.warning("resuming with changed training settings (checkpoint, now): %s", changed)


def model_config(options: ModelOptions, ds: Dataset, binarize: bool, resume: Optional[Dict]) -> VAEConfig:
    """The checkpoint's configuration when resuming (it must fit the data), else the options on the data's shape."""
    if resume is not None:
        config = VAEConfig(**resume["config"])
        if (config.channels, config.height, config.width) != (ds.channels, ds.height, ds.width):
            raise SystemExit(f"checkpoint is for {config.channels}x{config.height}x{config.width} images, "
                             f"the data is {ds.channels}x{ds.height}x{ds.width}")
        return config
    return VAEConfig(channels=ds.channels, height=ds.height, width=ds.width, latent_dim=options.latent_dim,
                     base_width=options.base_width, likelihood="bernoulli" if binarize else "logistic",
                     levels=2 if binarize else ds.levels, arch=architecture(options.arch, ds.height, ds.width),
                     prior=options.prior, pseudo_inputs=options.pseudo_inputs, mixture=options.mixture)


def build_model(options: RunOptions, ds: Dataset, resume: Optional[Dict]) -> VAE:
    torch.manual_seed(options.train.seed)  # the weight initialisation; everything later has its own generator
    vae = VAE(model_config(options.model, ds, options.recipe.binarize, resume))
    if vae.vamp is not None and resume is None:
        # Seeded training images as the first pseudo-inputs (with replacement if the split is smaller).
        rng = np.random.default_rng(options.train.seed)
        n = vae.config.pseudo_inputs
        picks = rng.choice(len(ds.train), size=n, replace=n > len(ds.train))
        vae.vamp.initialise_from(to_float(ds.train.images[picks], ds.levels))
    log.info("model: %s, %d parameters", asdict(vae.config), num_parameters(vae))
    return vae


def calibrate(serving: export.ServingModule, ds: Dataset, k: int, config: VAEConfig, device: torch.device,
              progress: bool) -> Tuple[Dict, Dict]:
    """Every score kind of the calib split, computed as the service will: 8-bit images through ``score`` (for a
    binarised model too: its test metrics use the dynamically binarised split, its scores may not)."""
    images = calibration.calibration_images(ds)
    score = _with_progress(serving.score, len(images), f"calibration (K={k})", progress)
    latent = calibration.artifact_latent(serving, {"methods": export.methods(serving)})
    return calibration.calibration_sections(score, images, k=k, noise_seed=calibration.NOISE_SEED,
                                            latent_dim=config.latent_dim, levels=config.levels, device=device,
                                            latent=latent)


def attribute_directions(serving: export.ServingModule, ds: Dataset, device: torch.device) -> Dict:
    """Directions from the train split's posterior means as served (8-bit), checked on the test split."""
    return directions.directions_section(serving.encode, (to_8bit(ds.train.images, ds.levels), ds.train.labels),
                                         (to_8bit(ds.test.images, ds.levels), ds.test.labels), device=device)


def training_section(config: trainer.TrainConfig, result: trainer.TrainResult, ctx: distributed.DistContext) -> Dict:
    last = result.history[-1] if result.history else {}
    return {"epochs_run": result.epochs_run, "best_epoch": result.best_epoch, "seed": config.seed,
            "beta": config.beta, "kl_warmup": config.kl_warmup, "free_bits": config.free_bits,
            "lr": config.lr, "lr_patience": config.lr_patience, "ema": config.ema,
            "batch_size": config.batch_size, "wall_time_s": round(result.wall_time_s, 2),
            "images_per_s": None if result.images_per_s is None else round(result.images_per_s, 1),
            "device": str(ctx.device), "world_size": ctx.world_size,
            "final": {k: v for k, v in last.items() if k.startswith(("train_", "val_"))}}


def write_report(options: RunOptions, meta: Dict, vae: VAE, ds: Dataset, test: Split, test_x: torch.Tensor,
                 history, calib_scores, device: torch.device) -> None:
    from training import report  # matplotlib and sklearn load only when a report is written

    vae.to(device)
    # 8-bit, as served and calibrated
    served_test = to_float(to_8bit(ds.test.images[:REPORT_TEST_SCORES], ds.levels), 256)
    test_scores = evaluate.anomaly_scores(vae, served_test, device, k=options.score_k,
                                          noise_seed=calibration.NOISE_SEED)
    report.write_report(options.out.parent, meta, history, vae=vae, test_x=test_x, test_labels=test.labels,
                        test_mu=evaluate.posterior_means(vae, test_x, device), calib_scores=calib_scores,
                        test_scores=test_scores, seed=options.train.seed)


def _with_progress(score: Callable, total: int, desc: str, enabled: bool) -> Callable:
    """``score`` that advances a tqdm bar by each call's rows; the bar closes once ``total`` rows are done."""
    bar = tqdm(total=total, desc=desc, unit="img", leave=False, disable=not enabled, dynamic_ncols=True)

    def scored(x: torch.Tensor, eps: torch.Tensor):
        out = score(x, eps)
        bar.update(x.shape[0])
        if bar.n >= total:
            bar.close()
        return out

    return scored
