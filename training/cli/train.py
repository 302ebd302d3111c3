"""``python -m training train`` (the default verb): data -> model -> train -> evaluate -> export -> report.

    python -m training --data digits --epochs 2 --out runs/digits/vae.ts
    torchrun --standalone --nproc_per_node 2 -m training --data idx:DIR --out runs/mnist/vae.ts

Defaults suit the default data (sklearn digits, a couple of minutes on two CPU cores). Next to the artifact go
``<name>.ckpt`` (the last checkpoint, for ``--resume``), ``report.json`` and the PNG figures.
"""

import argparse
import logging
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from training import calibration, distributed, priors, trainer
from training.data import VAL_FRACTION
from training.model import ARCHS, VAEConfig
from training.pipeline import ModelOptions, RunOptions, run
from training.recipe import DataRecipe

EVAL_N = 2000  # test images for the IW-NLL by default (a seeded random subset; its standard error is recorded)
LATENT_BANK = 10000  # training images in the latent bank: D * 4 bytes each in the artifact (docs/anomaly.md)
VAMP_PSEUDO_INPUTS = 100  # mixture components: each training step also encodes them (Tomczak & Welling use 500)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    defaults = trainer.TrainConfig()
    p = argparse.ArgumentParser(prog="python -m training train",
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
    ev.add_argument("--no-latent-density", dest="latent_density", action="store_false",
                    help="no latent density (a mixture of Gaussians over the training images' latent features, "
                         "by class when labelled) in the artifact, and so no density-bz2 score")
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


def options(args: argparse.Namespace) -> RunOptions:
    """The parsed command line as the pipeline's options."""
    return RunOptions(
        recipe=DataRecipe(args.data, classes=None if args.classes is None else tuple(args.classes),
                          image_size=args.image_size, channels=args.channels, val_fraction=args.val_fraction,
                          binarize=args.binarize),
        model=ModelOptions(latent_dim=args.latent_dim, base_width=args.base_width, arch=args.arch,
                           mixture=args.mixture, prior=args.prior, pseudo_inputs=args.pseudo_inputs or 0),
        train=trainer.TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                  weight_decay=args.weight_decay, beta=args.beta, kl_warmup=args.kl_warmup,
                                  free_bits=args.free_bits, grad_clip=args.grad_clip, patience=args.patience,
                                  lr_patience=args.lr_patience, ema=args.ema, seed=args.seed,
                                  binarize=args.binarize, amp=not args.no_amp, compile=args.compile),
        out=args.out, eval_k=args.eval_k, eval_n=args.eval_n, score_k=args.score_k, latent_bank=args.latent_bank,
        latent_density=args.latent_density,
        device=args.device, resume=args.resume, report=not args.no_report, quiet=args.quiet)


def print_summary(meta: Dict, out: Path, seconds: float) -> None:
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
    started = time.perf_counter()
    try:
        meta = run(options(args), ctx)
    finally:
        distributed.cleanup(ctx)
    if meta is not None:
        print_summary(meta, args.out, time.perf_counter() - started)
    return 0
