"""``python -m training ood``: how well each score kind separates normal from anomalous images, and the
calibration that turns scores into p-values.

    python -m training ood evaluate --model runs/fashion/vae.ts --normal idx:DATA/fashion-mnist --ood idx:DATA/mnist
    python -m training ood evaluate --model runs/mnist-no3/vae.ts --normal idx:DATA/mnist --holdout-class 3
    python -m training ood protocols --data-dir DATA --candidates   # every protocol, kind, baseline and candidate
    python -m training ood calibrate --model M.ts           # recompute the calibration from the recorded calib split
    python -m training ood calibrate --model M.ts --latent-density   # add the latent density (density-bz2)
    python -m training ood calibrate --model OLD.ts --assume-training-defaults   # artifacts before the data recipe
    python -m training ood sweep-k --model runs/fashion/vae.ts --normal idx:... --ood idx:...  # SE and cost vs K
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from training import ood, protocols
from training.calibration import artifact_latent, recalibrate
from vae_artifact.io import load_artifact

FORMATTER = argparse.ArgumentDefaultsHelpFormatter


def cmd_evaluate(args: argparse.Namespace) -> Dict:
    module, meta = load_artifact(args.model)
    classes = (meta.document.get("data") or {}).get("classes")
    if args.holdout_class is not None and classes is not None and args.holdout_class in classes:
        print(f"warning: {args.model} was trained on class {args.holdout_class}", file=sys.stderr)
    normal, anomalous = ood.test_sets(meta, args.normal, args.ood, args.holdout_class, args.limit)
    result = ood.evaluate_artifact(module.score, meta, normal, anomalous, artifact_latent(module, meta))
    result.update(model=str(args.model), normal=args.normal, ood=args.ood, holdout_class=args.holdout_class)
    print(ood.format_table(result))
    return result


def cmd_calibrate(args: argparse.Namespace) -> Dict:
    """Recompute every kind's calibration of an artifact from its own calib split and rewrite its metadata."""
    calibration = recalibrate(args.model, out=args.out, data=args.data, k=args.k,
                              assume_defaults=args.assume_training_defaults, latent_bank=args.latent_bank,
                              latent_density=args.latent_density)
    print(f"{args.out or args.model}: calibrated {list(calibration['scores'])} on n={calibration['n']} "
          f"with K={calibration['k']}")
    return calibration


def cmd_sweep_k(args: argparse.Namespace) -> Dict:
    module, meta = load_artifact(args.model)
    normal, anomalous = ood.test_sets(meta, args.normal, args.ood, args.holdout_class, args.limit)
    print(f"{'K':>5s} {'NLL':>9s} {'seed sd':>8s} {'SE mean':>8s} {'ESS':>6s} {'ms/img':>7s} {'cpu ms':>7s} "
          f"{'AUROC nll':>9s} {'AUROC ' + meta.scoring.default:>20s}")
    rows = {}
    for k, r in ood.sweep_k(module, meta, normal, anomalous, args.ks, repeats=args.repeats,
                            repeat_images=args.repeat_images):
        rows[k] = r
        print(f"{k:5d} {r['nll']:9.2f} {r['seed_sd']:8.3f} {r['se_mean'] or math.nan:8.3f} {r['ess']:6.2f} "
              f"{r['ms_per_image']:7.2f} {r['cpu_ms_per_image']:7.2f} {r['auroc_nll']:9.4f} "
              f"{r['auroc_default']:20.4f}", flush=True)
    return {"model": str(args.model), "n_normal": len(normal), "n_ood": len(anomalous), "repeats": args.repeats,
            "repeat_images": min(args.repeat_images, len(normal)), "threads": torch.get_num_threads(), "rows": rows}


def cmd_protocols(args: argparse.Namespace) -> Dict:
    started = time.perf_counter()
    summary = protocols.run(args)
    summary["wall_s"] = time.perf_counter() - started
    print(protocols.format_tables(summary))
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "ood.json").write_text(json.dumps(summary, indent=1))
    print(f"numbers in {args.work / 'ood.json'}")
    return summary


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training ood", description=__doc__.split("\n\n")[0],
                                formatter_class=FORMATTER)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("evaluate", "AUROC / AUPRC / FPR95 and FPR at alpha for every score kind and baseline"),
                        ("sweep-k", "NLL standard error, ESS, cost and AUROC for several K")):
        c = sub.add_parser(name, help=help_, description=help_, formatter_class=FORMATTER)
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
    c = sub.add_parser("protocols", help="train (or reuse) a model per protocol; every kind and baseline, one table",
                       description=protocols.__doc__.split("\n\n")[0], formatter_class=FORMATTER)
    c.add_argument("--data-dir", type=Path, required=True, help="holds mnist/ and fashion-mnist/ (IDX files)")
    c.add_argument("--holdout-classes", type=_classes, default=list(range(10)),
                   help="one protocol per held-out class and data set")
    c.add_argument("--sets", type=_sets, default=list(protocols.SETS),
                   help="the data sets held out from class by class (comma-separated: "
                        f"{','.join(protocols.SETS)}); Fashion-MNIST -> MNIST is always run")
    c.add_argument("--candidates", action="store_true",
                   help="also the detectors measured beside the kinds and not served (training.candidates)")
    c.add_argument("--work", type=Path, default=Path("runs/ood"), help="models, subsets and ood.json go here")
    c.add_argument("--model", type=_model_arg, action="append", default=[], metavar="PROTOCOL=PATH",
                   help="use this artifact for a protocol (fashion, mnist-no<C>, fashion-no<C>) instead of "
                        "training one")
    c.add_argument("--retrain", action="store_true", help="train again even where <work>/<protocol>/vae.ts exists")
    c.add_argument("--epochs", type=int, default=30, help="training epochs per model (early stopping may end sooner)")
    c.add_argument("--base-width", type=int, default=32, help="the model's conv width")
    c.add_argument("--k", type=int, default=16, help="importance samples: the served K (--score-k and --eval-k)")
    c.add_argument("--train-limit", type=int, default=None, help="train on the first N pool images (quick runs)")
    c.add_argument("--limit", type=int, default=None, help="evaluate on the first N images of each test set")
    c.add_argument("--train-args", nargs=argparse.REMAINDER, default=[], help="the rest goes to python -m training")
    c = sub.add_parser("calibrate", help="(re)compute every kind's calibration scores into an artifact",
                       description="(Re)compute every kind's calibration scores into an artifact, from the calib "
                                   "split its recorded data recipe rebuilds.", formatter_class=FORMATTER)
    c.add_argument("--model", type=Path, required=True)
    c.add_argument("--data", default=None, help="the same data at another location (default: the artifact's "
                                                "data.name); refused unless it rebuilds the recorded calib split")
    c.add_argument("--assume-training-defaults", action="store_true",
                   help="for artifacts that predate the recorded data recipe: assume the training command's "
                        "defaults (--val-fraction, --image-size, --channels) for what the recipe lacks; the "
                        "recorded split sizes and image shape are still checked")
    c.add_argument("--k", type=int, default=None, help="importance samples (default: the artifact's scoring.k)")
    c.add_argument("--latent-bank", type=int, default=None, metavar="N",
                   help="an artifact without a latent bank: export it again with one of N training images (its "
                        "recorded train split; same weights), so that it offers the fisher-bz2-nn kind")
    c.add_argument("--latent-density", action="store_true",
                   help="export it again with a latent density fitted on its recorded train split (same weights; "
                        "fitted again if it has one), so that it offers the density-bz2 kind")
    c.add_argument("--out", type=Path, default=None, help="write here instead of rewriting --model in place")
    return p.parse_args(argv)


def _model_arg(text: str) -> Tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not path:
        raise argparse.ArgumentTypeError(f"--model takes PROTOCOL=PATH, got {text!r}")
    return name, Path(path)


def _sets(text: str) -> List[str]:
    sets = [s.strip() for s in text.split(",") if s.strip()]
    if not all(s in protocols.SETS for s in sets):
        raise argparse.ArgumentTypeError(f"expected some of {list(protocols.SETS)}, comma-separated, got {text!r}")
    return sets


def _classes(text: str) -> List[int]:
    classes = [int(c) for c in text.split(",") if c.strip()]
    if not classes or not all(0 <= c <= 9 for c in classes):
        raise argparse.ArgumentTypeError(f"expected MNIST classes 0-9, comma-separated, got {text!r}")
    return classes


COMMANDS = {"evaluate": cmd_evaluate, "sweep-k": cmd_sweep_k, "calibrate": cmd_calibrate, "protocols": cmd_protocols}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    result = COMMANDS[args.command](args)
    print(f"wall time {time.perf_counter() - started:.1f}s ({torch.get_num_threads()} torch threads)")
    if getattr(args, "json", None):
        args.json.parent.mkdir(parents=True, exist_ok=True)
        result["wall_s"] = time.perf_counter() - started
        args.json.write_text(json.dumps(result, indent=1))
    return 0
