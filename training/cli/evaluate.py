"""``python -m training evaluate``: an artifact's test ELBO and importance-weighted NLL, through its own exported
methods, on the test split its recorded data recipe rebuilds.

    python -m training evaluate --model runs/mnist/vae.ts --k 5000 --n 1000
    python -m training evaluate --model runs/mnist/vae.ts --data idx:ELSEWHERE/mnist   # the same data, moved

With the K, subset and seed training used, a freshly exported artifact gives the numbers its metadata recorded;
another K or subset measures the same model again (e.g. a larger K for a tighter bound).
"""

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from training.data import held_out_splits, to_float
from training.evaluate import artifact_metrics
from training.recipe import recorded_dataset
from vae_artifact.io import load_artifact


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="artifact (vae.ts)")
    p.add_argument("--data", default=None, help="the same data at another location (default: the artifact's "
                                                "data.name); refused unless it rebuilds the recorded splits")
    p.add_argument("--k", type=int, default=None, help="importance samples (default: the artifact's evaluation K)")
    p.add_argument("--n", type=int, default=None,
                   help="test images, a seeded random subset (default: the artifact's; 0: the whole test split)")
    p.add_argument("--seed", type=int, default=None, help="subset and noise seed (default: the training seed)")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    module, meta = load_artifact(args.model)
    document = meta.to_dict()
    recorded = document.get("evaluation") or {}
    try:
        ds = recorded_dataset(document.get("data") or {}, data=args.data)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"{args.model}: cannot rebuild its test split: {exc}") from exc
    _, test, levels = held_out_splits(ds, bool(document["data"].get("binarize")))
    k = args.k or recorded.get("iw_k") or 1000
    n = recorded.get("n_test") if args.n is None else args.n
    seed = (document.get("training") or {}).get("seed", 0) if args.seed is None else args.seed
    metrics = artifact_metrics(module, to_float(test.images, levels), k=k, num_dims=meta.image.num_dims, seed=seed,
                               n=n, progress=sys.stderr.isatty())
    print(f"test ELBO     {metrics['test_elbo_nats']:.3f} ± {metrics['test_elbo_se']:.3f} nats  "
          f"({metrics['elbo_bits_per_dim']:.4f} bits/dim)")
    print(f"test IW-NLL   {metrics['iw_nll_nats']:.3f} ± {metrics['iw_nll_se']:.3f} nats  "
          f"({metrics['iw_nll_bits_per_dim']:.4f} bits/dim, K={k}, {metrics['n_test']} of "
          f"{metrics['n_test_total']} test images)")
    print(f"active units  {metrics['active_units']} / {metrics['latent_dim']}")
    print(f"wall time     {time.perf_counter() - started:.1f}s")
    if args.json:
        args.json.write_text(json.dumps(dict(metrics, model=str(args.model)), indent=1))
    return 0
