"""``python -m training`` / ``vae-train``: data -> model -> train -> evaluate -> export -> report.

    python -m training --data digits --epochs 2 --out runs/digits/vae.ts
    torchrun --standalone --nproc_per_node 2 -m training --data idx:DIR --out runs/mnist/vae.ts

Defaults are tuned for the default data (sklearn digits, a couple of minutes on two CPU cores). Next to the
artifact go ``<name>.ckpt`` (the last checkpoint, for ``--resume``), ``report.json`` and the PNG figures.
"""

import argparse
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from training import calibration, directions, distributed, evaluate, export, priors, trainer
from training.data import VAL_FRACTION, Dataset, held_out_splits, to_8bit, to_float
from training.model import ARCHS, VAE, VAEConfig, num_parameters
from training.recipe import DataRecipe, data_section

log = logging.getLogger("training")

REPORT_TEST_SCORES = 2000  # test images scored for the report's histogram: enough for its shape, bounded cost
EVAL_N = 2000  # test images for the IW-NLL by default (a seeded random subset; its standard error is recorded)
LATENT_BANK = 10000  # training images in the latent bank: D * 4 bytes each in the artifact (docs/anomaly.md)
VAMP_PSEUDO_INPUTS = 100  # mixture components: each training step also encodes them (Tomczak & Welling use 500)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    defaults = trainer.TrainConfig()
    p = argparse.ArgumentParser(prog="python -m training",
                                description="Train a VAE and export it as one TorchScript artifact with a report.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data", default="digits", help="digits | idx:DIR | folder:DIR | npz:FILE")
    data.add_argument("--classes", type=_int_list, default=None, help="train on these labels only, e.g. 0,1,2")
    data.add_argument("--val-fraction", type=float, default=VAL_FRACTION,
                      help="of the non-test images, for early stopping")
    data.add_argument("--image-size", type=int, default=None, help="resize to this square side")
    data.add_argument("--channels", type=int, choices=(1, 3), default=None, help="convert to gray or RGB")
    data.add_argument("--binarize", action="store_true",
                      help="dynamically binarised training data and a Bernoulli likelihood "
                           "(default: discretised logistic over the data's pixel levels)")
    model = p.add_argument_group("model")
    model.add_argument("--latent-dim", type=_positive_int, default=VAEConfig.latent_dim, help="latent size D")
    model.add_argument("--base-width", type=_positive_int, default=VAEConfig.base_width,
                       help="conv channels after the stem")
    model.add_argument("--arch", choices=("auto", *ARCHS), default="auto",
                       help="conv layout: full (3x3 layers at full resolution) or lean (none there: several times "
                            "the images/s); auto: lean when both sides are >= 16 (28x28, 32x32, ...), else full")
    model.add_argument("--mixture", type=_positive_int, default=VAEConfig.mixture, metavar="M",
                       help="p(x|z) per pixel: a mixture of M discretised logistics (1: one logistic); "
                            "not with --binarize")
    model.add_argument("--prior", choices=priors.PRIORS, default="standard",
                       help="p(z): standard = N(0, I); vamp = the VampPrior, a mixture of the encoder's posteriors "
                            "at learned pseudo-inputs (Tomczak & Welling 2018)")
    model.add_argument("--pseudo-inputs", type=_positive_int, default=None, metavar="N",
                       help=f"the VampPrior's pseudo-inputs (mixture components); only with --prior vamp "
                            f"(default there: {VAMP_PSEUDO_INPUTS})")
    opt = p.add_argument_group("training")
    opt.add_argument("--beta", type=float, default=defaults.beta, help="KL weight after warm-up")
    opt.add_argument("--kl-warmup", type=float, default=defaults.kl_warmup, help="epochs of KL warm-up 0 -> beta")
    opt.add_argument("--free-bits", type=float, default=defaults.free_bits, help="nats per latent dim")
    opt.add_argument("--lr", type=float, default=defaults.lr, help="AdamW learning rate")
    opt.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="AdamW weight decay")
    opt.add_argument("--grad-clip", type=float, default=defaults.grad_clip, help="max gradient norm (0: off)")
    opt.add_argument("--batch-size", type=_positive_int, default=defaults.batch_size, help="per process")
    opt.add_argument("--epochs", type=_positive_int, default=defaults.epochs, help="at most (early stopping)")
    opt.add_argument("--patience", type=int, default=defaults.patience,
                     help="stop after this many epochs without a better validation ELBO (0: never)")
    opt.add_argument("--lr-patience", type=int, default=defaults.lr_patience, metavar="N",
                     help="halve the learning rate after N epochs without a better validation ELBO (0: constant)")
    opt.add_argument("--ema", type=float, default=defaults.ema, metavar="DECAY",
                     help="validate, early-stop on and export an exponential moving average of the weights with "
                          "this decay per step, e.g. 0.999 (Polyak averaging; 0: the weights themselves)")
    opt.add_argument("--seed", type=int, default=defaults.seed, help="weights init, shuffling and noise")
    opt.add_argument("--device", choices=distributed.DEVICES, default="auto", help="auto: cuda if available")
    opt.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    opt.add_argument("--compile", action="store_true",
                     help="torch.compile the training step (CPU, lean 28x28: ~1.1x images/s after a compile of "
                          "tens of seconds; needs a C compiler)")
    opt.add_argument("--resume", type=Path, default=None, metavar="CKPT", help="continue from this checkpoint")
    ev = p.add_argument_group("evaluation and output")
    ev.add_argument("--eval-k", type=_positive_int, default=1000, help="importance samples for the test NLL")
    ev.add_argument("--eval-n", type=_eval_n, default=EVAL_N,
                    help="test images for the test ELBO / IW-NLL, a seeded random subset (its standard error "
                         "is recorded); 0 or 'all': the whole test split")
    ev.add_argument("--score-k", type=_positive_int, default=calibration.DEFAULT_K,
                    help="importance samples per anomaly score (the service's K; see docs/anomaly.md)")
    ev.add_argument("--latent-bank", type=_non_negative_int, default=LATENT_BANK, metavar="N",
                    help="posterior means of N training images (a seeded sample; all when fewer) kept in the "
                         "artifact for the fisher-bz2-nn score's nearest-neighbour distance; 0: none")
    ev.add_argument("--out", type=Path, default=Path("runs/vae.ts"), help="artifact path")
    ev.add_argument("--no-report", action="store_true", help="skip report.json and the figures")
    ev.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    args = p.parse_args(argv)
    if args.mixture > 1 and args.binarize:
        p.error("--mixture is a mixture of discretised logistics; --binarize uses a Bernoulli likelihood")
    if not 0.0 <= args.ema < 1.0:
        p.error(f"--ema is a decay per step in [0, 1) (0: no average), got {args.ema}")
    if args.pseudo_inputs is not None and args.prior != "vamp":
        p.error(f"--pseudo-inputs needs --prior vamp (the {args.prior} prior has no pseudo-inputs)")
    if args.prior == "vamp":
        if args.free_bits > 0:
            p.error("--free-bits needs a KL per latent dimension, which the VampPrior has not (its KL is a "
                    "one-sample estimate of the whole); use --kl-warmup instead")
        args.pseudo_inputs = args.pseudo_inputs or VAMP_PSEUDO_INPUTS
    return args


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _eval_n(text: str) -> int:
    """--eval-n: a count of test images, 0 or 'all' for every one."""
    if text.strip().lower() == "all":
        return 0
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of images or 'all', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of images >= 0 or 'all', got {text!r}")
    return value


def _int_list(text: str) -> List[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def train_config(args: argparse.Namespace) -> trainer.TrainConfig:
    return trainer.TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                               weight_decay=args.weight_decay, beta=args.beta, kl_warmup=args.kl_warmup,
                               free_bits=args.free_bits, grad_clip=args.grad_clip, patience=args.patience,
                               lr_patience=args.lr_patience, ema=args.ema,
                               seed=args.seed, binarize=args.binarize, amp=not args.no_amp,
                               compile=args.compile)


def model_config(args: argparse.Namespace, ds: Dataset, resume: Optional[Dict]) -> VAEConfig:
    if resume is not None:
        config = VAEConfig(**resume["config"])
        if (config.channels, config.height, config.width) != (ds.channels, ds.height, ds.width):
            raise SystemExit(f"checkpoint is for {config.channels}x{config.height}x{config.width} images, "
                             f"the data is {ds.channels}x{ds.height}x{ds.width}")
        return config
    return VAEConfig(channels=ds.channels, height=ds.height, width=ds.width, latent_dim=args.latent_dim,
                     base_width=args.base_width, likelihood="bernoulli" if args.binarize else "logistic",
                     levels=2 if args.binarize else ds.levels, arch=architecture(args.arch, ds.height, ds.width),
                     prior=args.prior, pseudo_inputs=args.pseudo_inputs or 0, mixture=args.mixture)


def architecture(choice: str, height: int, width: int) -> str:
    """--arch auto: lean for images of 16x16 and up, where the full-resolution layers cost most; full below
    (an 8x8 image has one stride-2 step, and the lean layout would leave it a single convolution)."""
    if choice != "auto":
        return choice
    return "lean" if min(height, width) >= 16 and height % 2 == 0 and width % 2 == 0 else "full"


def run(args: argparse.Namespace, ctx: distributed.DistContext) -> Optional[Dict]:
    """Everything after argument parsing; returns the artifact metadata on rank 0, None elsewhere."""
    started = time.perf_counter()
    # Everything that decides the splits, recorded in the artifact so recalibration rebuilds the same calib split.
    recipe = DataRecipe(args.data, classes=None if args.classes is None else tuple(args.classes),
                        image_size=args.image_size, channels=args.channels, val_fraction=args.val_fraction,
                        binarize=args.binarize)
    try:
        ds = recipe.load()
    except (ValueError, FileNotFoundError) as exc:  # bad --data / options: a message, not a traceback
        raise SystemExit(f"python -m training: error: {exc}") from exc
    val, test, eval_levels = held_out_splits(ds, args.binarize)
    resume = trainer.load_checkpoint(args.resume) if args.resume else None
    config = train_config(args)
    if resume is not None:
        # A setting added since the checkpoint was written ran at its default, which keeps the old behaviour;
        # --epochs is how a run is extended.
        recorded = {**asdict(trainer.TrainConfig()), **resume["train_config"]}
        changed = {k: (recorded[k], v) for k, v in asdict(config).items() if recorded[k] != v and k != "epochs"}
        if changed:
            log.warning("resuming with changed training settings (checkpoint, now): %s", changed)
    torch.manual_seed(args.seed)  # the weight initialisation; everything later has its own seeded generator
    vae = VAE(model_config(args, ds, resume))
    if vae.vamp is not None and resume is None:
        # Seeded training images as the first pseudo-inputs (with replacement if the split is smaller).
        rng = np.random.default_rng(args.seed)
        n = vae.config.pseudo_inputs
        picks = rng.choice(len(ds.train), size=n, replace=n > len(ds.train))
        vae.vamp.initialise_from(to_float(ds.train.images[picks], ds.levels))
    log.info("model: %s, %d parameters", asdict(vae.config), num_parameters(vae))
    progress = not args.quiet and sys.stderr.isatty()
    result = trainer.train(vae, ds.train, val, ds.levels, config, ctx, val_levels=eval_levels,
                           checkpoint_path=args.out.with_suffix(".ckpt"), resume=resume, progress=progress)
    distributed.cleanup(ctx, together=True)
    if not ctx.is_main:
        return None

    device = ctx.device
    test_x = to_float(test.images, eval_levels)
    metrics = evaluate.test_metrics(vae, test_x, device, k=args.eval_k, seed=args.seed, n=args.eval_n,
                                    progress=progress)
    # The latent bank (posterior means of training images, as served) for the fisher-<c>-nn kinds.
    bank = export.latent_bank(vae, ds.train, ds.levels, args.latent_bank, seed=args.seed) if args.latent_bank else None
    serving = export.ServingModule(vae.eval(), bank).to(device)
    # Every score kind of the calib split, computed as the service will: 8-bit images through ``score`` (for a
    # binarised model too: the test metrics above use the dynamically binarised split, the scores may not).
    calib_images = calibration.calibration_images(ds)
    scoring, calibrated = calibration.calibration_sections(
        _with_progress(serving.score, len(calib_images), f"calibration (K={args.score_k})", progress), calib_images,
        k=args.score_k, noise_seed=calibration.NOISE_SEED, latent_dim=vae.config.latent_dim, levels=vae.config.levels,
        device=device, neighbours=serving.latent_neighbour_distance if bank is not None else None)
    calib_scores = calibrated["scores"]["nll"]
    # Attribute directions from the train split's posterior means as served (8-bit), checked on the test split.
    latent_directions = directions.directions_section(
        serving.encode, (to_8bit(ds.train.images, ds.levels), ds.train.labels),
        (to_8bit(ds.test.images, ds.levels), ds.test.labels), device=device)
    last = result.history[-1] if result.history else {}
    meta = export.build_metadata(
        vae,
        neighbours=bank is not None,
        data=data_section(recipe, ds),
        training={"epochs_run": result.epochs_run, "best_epoch": result.best_epoch, "seed": args.seed,
                  "beta": config.beta, "kl_warmup": config.kl_warmup, "free_bits": config.free_bits,
                  "lr": config.lr, "lr_patience": config.lr_patience, "ema": config.ema,
                  "batch_size": config.batch_size, "wall_time_s": round(result.wall_time_s, 2),
                  "images_per_s": None if result.images_per_s is None else round(result.images_per_s, 1),
                  "device": str(device), "world_size": ctx.world_size,
                  "final": {k: v for k, v in last.items() if k.startswith(("train_", "val_"))}},
        evaluation=metrics,
        scoring=scoring,
        calibration=calibrated,
        directions=latent_directions,
    )
    meta = export.export_artifact(vae, args.out, meta, check_x=test_x[:8], latent_bank=bank)
    if not args.no_report:
        from training import report  # matplotlib and sklearn load only when a report is written

        vae.to(device)
        served_test = to_float(to_8bit(ds.test.images[:REPORT_TEST_SCORES], ds.levels), 256)  # 8-bit, as served and calibrated
        test_scores = evaluate.anomaly_scores(vae, served_test, device, k=args.score_k,
                                              noise_seed=calibration.NOISE_SEED)
        report.write_report(args.out.parent, meta, result.history, vae=vae, test_x=test_x, test_labels=test.labels,
                            test_mu=evaluate.posterior_means(vae, test_x, device), calib_scores=calib_scores,
                            test_scores=test_scores, seed=args.seed)
    _print_summary(meta, args.out, time.perf_counter() - started)
    return meta


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


def _print_summary(meta: Dict, out: Path, seconds: float) -> None:
    ev, tr = meta["evaluation"], meta["training"]
    print(f"artifact      {out}")
    print(f"data          {meta['data']['name']}  train/val/calib/test = {meta['data']['n_train']}/"
          f"{meta['data']['n_val']}/{meta['data']['n_calib']}/{meta['data']['n_test']}")
    rate = "no epoch in this run" if tr.get("images_per_s") is None else f"{tr['images_per_s']:.0f} images/s"
    print(f"training      {tr['epochs_run']} epochs (best {tr['best_epoch']}), {tr['wall_time_s']:.1f}s on "
          f"{tr['device']} x{tr['world_size']} ({rate}); {seconds:.1f}s in all")
    print(f"test ELBO     {ev['test_elbo_nats']:.3f} ± {ev['test_elbo_se']:.3f} nats  "
          f"({ev['elbo_bits_per_dim']:.4f} bits/dim)")
    print(f"test IW-NLL   {ev['iw_nll_nats']:.3f} ± {ev['iw_nll_se']:.3f} nats  "
          f"({ev['iw_nll_bits_per_dim']:.4f} bits/dim, K={ev['iw_k']}, {ev['n_test']} of {ev['n_test_total']} "
          f"test images)")
    print(f"active units  {ev['active_units']} / {ev['latent_dim']}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    ctx = distributed.setup(args.device)
    level = logging.WARNING if args.quiet or not ctx.is_main else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run(args, ctx)
    finally:
        distributed.cleanup(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
