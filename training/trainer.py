"""The training loop: AdamW on the beta-VAE loss with KL warm-up, free bits, gradient clipping, AMP on CUDA,
early stopping on the validation ELBO, a checkpoint every epoch, resume, and DDP under `torchrun`.

Modelled on pytorch/examples ``mnist/main.py`` (``train_one_epoch(model, loader, optimizer, device)``) and
nanoGPT (a pure schedule function; checkpoints saved from the unwrapped module). All randomness after the
weight initialisation comes from generators seeded by (seed, epoch, rank): the shuffle, the dynamic
binarisation and the reparameterisation noise. So a fixed seed gives the same weights on CPU, and a resumed
run continues exactly as if it had never stopped.
"""

import logging
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, TensorDataset
from tqdm import tqdm

from training import distributed, evaluate, objectives
from training.data import Split, make_loader, to_float
from training.distributed import DistContext
from training.model import VAE

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    epochs: int = 100  # an upper bound: early stopping ends digits runs after ~50
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4  # AdamW's decoupled decay; small, the KL term already regularises
    beta: float = 1.0
    kl_warmup: float = 0.0  # epochs over which the KL weight rises linearly from 0 to beta
    free_bits: float = 0.0  # nats per latent dim below which KL is not penalised
    grad_clip: float = 100.0  # the loss is nats per image (a sum over pixels), so norms of 10-100 are normal
    patience: int = 10  # epochs without a better validation ELBO before stopping; 0 disables
    lr_patience: int = 0  # halve the learning rate after this many epochs without a better validation ELBO; 0: never
    seed: int = 0
    binarize: bool = False  # dynamic binarisation: a fresh Bernoulli draw of every training batch
    amp: bool = True  # bf16 (or fp16 + GradScaler) autocast; only ever used on CUDA
    compile: bool = False  # torch.compile the training step: a little faster after a compile of tens of seconds
    ema: float = 0.0  # decay per step of an exponential moving average of the weights (e.g. 0.999); 0: none

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if not self.lr > 0 or self.beta < 0 or self.kl_warmup < 0 or self.free_bits < 0 or self.patience < 0 \
                or self.lr_patience < 0 or not 0.0 <= self.ema < 1.0:
            raise ValueError(f"invalid hyperparameters: lr={self.lr}, beta={self.beta}, kl_warmup="
                             f"{self.kl_warmup}, free_bits={self.free_bits}, patience={self.patience}, "
                             f"lr_patience={self.lr_patience}, ema={self.ema}")


@dataclass
class TrainResult:
    history: List[Dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0  # 1-based epoch whose weights the model holds at the end
    best_val_elbo: float = float("-inf")
    epochs_run: int = 0
    wall_time_s: float = 0.0  # training time over all epochs in the history, resumed runs included
    # Training images per second (all ranks), mean over this run's epochs; None when this run trained none (a
    # resumed run that only evaluates): the history keeps epoch times, not rates.
    images_per_s: Optional[float] = None


def kl_weight(epoch: float, warmup_epochs: float, beta: float) -> float:
    """KL weight at (fractional) ``epoch``: rises linearly from 0 to ``beta`` over ``warmup_epochs``."""
    if warmup_epochs <= 0:
        return beta
    return beta * min(1.0, max(0.0, epoch) / warmup_epochs)


def seeded(device: torch.device, *key: int) -> torch.Generator:
    """A generator on ``device`` whose seed depends only on ``key`` (e.g. seed, epoch, rank)."""
    seed = int(np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0]) >> 1  # < 2**63
    return torch.Generator(device).manual_seed(seed)


def make_train_loader(split: Split, levels: int, batch_size: int, seed: int,
                      ctx: DistContext) -> Tuple[DataLoader, DistributedSampler]:
    """Shuffled batches of this rank's shard, and the sampler to ``set_epoch`` on. DistributedSampler (also
    in a world of one) shuffles with seed + epoch, so the order of epoch e never depends on how we got there;
    it pads the shards to equal length, so every rank runs the same number of steps (DDP needs that)."""
    data = TensorDataset(torch.from_numpy(split.images), torch.from_numpy(split.labels))
    sampler = DistributedSampler(data, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed)
    # Whole index lists per batch: one tensor gather per batch instead of B single-item fetches.
    loader = DataLoader(data, sampler=BatchSampler(sampler, batch_size, drop_last=False), batch_size=None,
                        collate_fn=partial(_to_float_batch, levels=levels))
    return loader, sampler


def _to_float_batch(batch, levels: int):
    images, labels = batch
    return to_float(images, levels), labels


def unwrap(model: nn.Module) -> VAE:
    return model.module if isinstance(model, DistributedDataParallel) else model


def amp_dtype(device: torch.device, enabled: bool) -> Optional[torch.dtype]:
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@contextmanager
def flush_denormals(device: torch.device) -> Iterator[None]:
    """On CPU, flush denormal floats to zero for a block, then restore the default (off: the service and the
    calibration scores must not depend on whether training ran in the same process). Far in the tails,
    exp() underflows into denormals, on which x86 arithmetic is many times slower (docs/results.md: the same
    weights, several times the images/s)."""
    enabled = device.type == "cpu" and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if enabled:
            torch.set_flush_denormal(False)


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, device: torch.device,
                    *, epoch: int, config: TrainConfig, generator: torch.Generator,
                    scaler: Optional[torch.amp.GradScaler] = None, autocast_dtype: Optional[torch.dtype] = None,
                    ema: Optional[AveragedModel] = None, progress: bool = False) -> Dict[str, float]:
    """One pass over ``loader``; returns this rank's per-image means {"loss", "rec", "kl", "elbo"}, "n",
    "kl_weight" and "images_per_s" (loss is the weighted objective, elbo = rec - kl with the true KL: closed
    form under N(0, I), the one-sample estimate under the VampPrior). ``ema``, if given, is updated from the
    unwrapped model after every optimizer step."""
    model.train()
    vae = unwrap(getattr(model, "_orig_mod", model))  # under DDP and/or torch.compile
    latent_dim = vae.config.latent_dim
    steps = len(loader)
    sums = {"loss": 0.0, "rec": 0.0, "kl": 0.0, "elbo": 0.0}
    n, weight = 0, 0.0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, disable=not progress, dynamic_ncols=True)
    started = time.perf_counter()
    for step, (x, _) in enumerate(bar):
        x = x.to(device, non_blocking=True)
        if config.binarize:
            x = torch.bernoulli(x, generator=generator)
        eps = torch.randn(x.shape[0], latent_dim, generator=generator, device=device)
        weight = kl_weight(epoch + step / steps, config.kl_warmup, config.beta)
        with torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext():
            rec, kl_dims, _ = model(x, eps)  # the KL terms inside forward: DDP must see every parameter used
        # The objective in float32 whatever autocast did: it sums thousands of per-pixel terms.
        rec, kl_dims = rec.float(), kl_dims.float()
        loss = objectives.beta_vae_loss(rec, kl_dims, weight, config.free_bits)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        else:
            loss.backward()
        if config.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if ema is not None:
            ema.update_parameters(vae)
        b, kl = x.shape[0], kl_dims.sum(dim=1).detach()
        # .item() here is a host-device sync point; one per step is negligible for a model this small.
        batch = {"loss": loss.item(), "rec": rec.detach().mean().item(), "kl": kl.mean().item()}
        batch["elbo"] = batch["rec"] - batch["kl"]
        for key, value in batch.items():
            sums[key] += value * b
        n += b
        bar.set_postfix(loss=f"{batch['loss']:.2f}", rec=f"{batch['rec']:.2f}", kl=f"{batch['kl']:.2f}",
                        img_s=f"{n / max(time.perf_counter() - started, 1e-9):.0f}")
    bar.close()
    rate = n / max(time.perf_counter() - started, 1e-9)
    return {**{k: v / max(n, 1) for k, v in sums.items()}, "n": float(n), "kl_weight": weight, "images_per_s": rate}


def validate(vae: VAE, split: Split, levels: int, device: torch.device, ctx: DistContext,
             batch_size: int) -> Dict[str, float]:
    """Validation ELBO over all ranks: each rank scores a disjoint shard, the sums are all-reduced."""
    shard = Split(split.images[ctx.rank :: ctx.world_size], split.labels[ctx.rank :: ctx.world_size])
    loader = make_loader(shard, levels, batch_size=batch_size, shuffle=False, seed=0)
    totals = evaluate.estimate_elbo(vae, loader, device, noise_seed=0)
    return evaluate.means(distributed.all_reduce_sums(totals, ctx))


def save_checkpoint(path: Path, vae: VAE, optimizer, scaler, config: TrainConfig, epoch: int,
                    best: Dict[str, Any], history: List[Dict[str, float]],
                    ema: Optional[AveragedModel] = None) -> None:
    checkpoint = {
        "model": vae.state_dict(),  # the unwrapped module: no DDP "module." prefix
        "ema": ema.state_dict() if ema is not None else None,  # the average's weights and its update count
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "config": asdict(vae.config),
        "train_config": asdict(config),
        "epoch": epoch,  # epochs completed
        "best": best,  # {"epoch", "val_elbo", "model": state dict of the best weights so far}
        "history": history,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)  # a crash mid-save never leaves a half-written checkpoint behind


def load_checkpoint(path: Path) -> Dict[str, Any]:
    # weights_only: a checkpoint is data (tensors, numbers, strings), never code to run.
    return torch.load(path, map_location="cpu", weights_only=True)


def train(vae: VAE, train_split: Split, val_split: Split, levels: int, config: TrainConfig, ctx: DistContext,
          *, val_levels: Optional[int] = None, checkpoint_path: Optional[Path] = None,
          resume: Optional[Dict[str, Any]] = None, progress: Optional[bool] = None) -> TrainResult:
    """Train ``vae`` in place and leave it holding the weights of its best validation epoch: the moving
    average's at that epoch when ``config.ema`` is set (validated, early-stopped on and exported in its place).

    ``levels`` is the training split's pixel levels; ``val_levels`` the validation split's (2 once
    binarised). ``resume`` is a checkpoint dict from ``load_checkpoint``; training continues after its epoch
    up to ``config.epochs`` in total. ``progress``: a tqdm bar per epoch (default: on rank 0 when stderr is a
    terminal).
    """
    device = ctx.device
    vae.to(device)
    # The fused kernel updates every tensor in one pass; on CPU the per-tensor loop was a quarter of a lean
    # 28x28 model's step (profiled). CUDA keeps the default (foreach), which AMP's GradScaler is tested with.
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  fused=device.type == "cpu" or None)
    dtype = amp_dtype(device, config.amp)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None  # bf16 needs no scaling
    result = TrainResult()
    best: Dict[str, Any] = {"epoch": 0, "val_elbo": float("-inf"), "model": None}
    start_epoch = 0
    if resume is not None:
        vae.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if scaler is not None and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        start_epoch, best, result.history = resume["epoch"], resume["best"], list(resume["history"])
        log.info("resumed after epoch %d (best val ELBO %.3f at epoch %d)", start_epoch, best["val_elbo"],
                 best["epoch"])
    # The average is of the unwrapped module's weights (every rank holds the same ones under DDP); it starts
    # as a copy of the weights at the first step, or continues from the checkpoint's.
    ema = AveragedModel(vae, multi_avg_fn=get_ema_multi_avg_fn(config.ema), use_buffers=True) \
        if config.ema else None
    if ema is not None and resume is not None and resume.get("ema"):
        ema.load_state_dict(resume["ema"])
    elif ema is not None and resume is not None:
        log.warning("the checkpoint has no moving average: it starts from the resumed weights")
    evaluated = ema.module if ema is not None else vae  # what validation, early stopping and the export see
    model = DistributedDataParallel(vae, device_ids=[device.index] if device.type == "cuda" else None) \
        if ctx.enabled else vae
    if config.compile:  # wraps the training path only: checkpoints, validation and export use ``vae`` itself
        model = torch.compile(model)
    loader, sampler = make_train_loader(train_split, levels, config.batch_size, config.seed, ctx)
    progress = ctx.is_main and (sys.stderr.isatty() if progress is None else progress)
    epoch, rates = start_epoch, []
    last_decay = _last_lr_change(result.history, optimizer.param_groups[0]["lr"])
    for epoch in range(start_epoch, config.epochs):
        if config.patience and epoch - best["epoch"] >= config.patience:
            log.info("early stop: no better validation ELBO since epoch %d", best["epoch"])
            break
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        with flush_denormals(device):
            train_m = train_one_epoch(model, loader, optimizer, device, epoch=epoch, config=config,
                                      generator=seeded(device, config.seed, epoch, ctx.rank), scaler=scaler,
                                      autocast_dtype=dtype, ema=ema, progress=progress)
        train_m = _global_means(train_m, ctx)
        val_m = validate(evaluated, val_split, val_levels or levels, device, ctx, max(config.batch_size, 256))
        rates.append(train_m["images_per_s"])  # a timing, like time_s: kept out of the (reproducible) history
        row = {"epoch": epoch + 1, "kl_weight": train_m["kl_weight"], "time_s": time.perf_counter() - t0,
               "lr": optimizer.param_groups[0]["lr"],
               **{f"train_{k}": train_m[k] for k in ("loss", "rec", "kl", "elbo")},
               **{f"val_{k}": val_m[k] for k in ("loss", "rec", "kl", "elbo")}}
        result.history.append(row)
        improved = val_m["elbo"] > best["val_elbo"]
        if improved:
            best = {"epoch": epoch + 1, "val_elbo": val_m["elbo"],
                    "model": {k: v.detach().cpu().clone() for k, v in evaluated.state_dict().items()}}
        log.info("epoch %d/%d  train loss %.3f (rec %.3f, kl %.3f, w %.2f)  val ELBO %.3f%s  %.1fs (%.0f images/s)",
                 epoch + 1, config.epochs, row["train_loss"], row["train_rec"], row["train_kl"], row["kl_weight"],
                 row["val_elbo"], " *" if improved else "", row["time_s"], rates[-1])
        if config.lr_patience and epoch + 1 - max(best["epoch"], last_decay) >= config.lr_patience:
            for group in optimizer.param_groups:
                group["lr"] *= 0.5
            last_decay = epoch + 1
            log.info("learning rate halved to %.3g: no better validation ELBO since epoch %d", row["lr"] * 0.5,
                     best["epoch"])
        if ctx.is_main and checkpoint_path is not None:
            save_checkpoint(checkpoint_path, vae, optimizer, scaler, config, epoch + 1, best, result.history, ema)
    else:
        epoch = config.epochs
    if best["model"] is not None:
        vae.load_state_dict(best["model"])  # early stopping keeps the best epoch, not the last
    result.best_epoch, result.best_val_elbo = best["epoch"], best["val_elbo"]
    result.epochs_run = epoch
    result.wall_time_s = sum(row["time_s"] for row in result.history)
    result.images_per_s = sum(rates) / len(rates) if rates else None
    return result


def _last_lr_change(history: List[Dict[str, float]], lr_now: float) -> int:
    """The last epoch after which the learning rate was halved (0: never), from a resumed run's history (each
    row holds the rate its epoch ran at) and the optimizer's rate now (a halving after the last row is only
    there). Rows from before ``lr`` was recorded count as unchanged."""
    rates = [(row["epoch"], row.get("lr")) for row in history] + [(len(history) + 1, lr_now)]
    changed = [epoch - 1 for (_, before), (epoch, after) in zip(rates, rates[1:])
               if before is not None and after is not None and after != before]
    return changed[-1] if changed else 0


def _global_means(metrics: Dict[str, float], ctx: DistContext) -> Dict[str, float]:
    """Turn per-rank means into means over every rank's images; images/s into the sum over ranks."""
    n, own = metrics["n"], ("n", "kl_weight", "images_per_s")
    sums = distributed.all_reduce_sums({k: v * n for k, v in metrics.items() if k not in own}
                                       | {"n": n, "images_per_s": metrics["images_per_s"]}, ctx)
    return {**{k: v / max(sums["n"], 1.0) for k, v in sums.items() if k not in own},
            "kl_weight": metrics["kl_weight"], "images_per_s": sums["images_per_s"]}
