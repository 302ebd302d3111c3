"""The training loop: it learns, it is reproducible, it resumes, its schedule, and the CLI's outputs."""

import json

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from training import data, trainer
from training.cli import main
from training.cli.train import parse_args
from training.data import Split, make_loader
from training.distributed import DistContext
from training.model import VAE, VAEConfig
from vae_artifact.io import load_artifact

CPU = DistContext(rank=0, world_size=1, device=torch.device("cpu"))


def small_vae(seed: int = 0) -> VAE:
    torch.manual_seed(seed)
    return VAE(VAEConfig(channels=1, height=8, width=8, latent_dim=4, base_width=8, hidden=32, levels=17))


def subset(split: Split, n: int) -> Split:
    return Split(split.images[:n], split.labels[:n])


def run_training(dataset, epochs: int, seed: int = 0, ema: float = 0.0, **kwargs):
    vae = small_vae(seed)
    config = trainer.TrainConfig(epochs=epochs, batch_size=32, lr=3e-3, seed=seed, patience=0, ema=ema)
    result = trainer.train(vae, subset(dataset.train, 256), subset(dataset.val, 64), dataset.levels, config, CPU,
                           **kwargs)
    return vae, result


def test_kl_weight_schedule():
    assert trainer.kl_weight(0.0, 10, 1.0) == 0.0
    assert trainer.kl_weight(2.5, 10, 1.0) == pytest.approx(0.25)
    assert trainer.kl_weight(5.0, 10, 4.0) == pytest.approx(2.0)
    assert trainer.kl_weight(10.0, 10, 1.0) == 1.0
    assert trainer.kl_weight(37.0, 10, 0.5) == 0.5  # stays at beta after warm-up
    assert trainer.kl_weight(0.0, 0, 0.7) == 0.7  # no warm-up: beta from the first step
    weights = [trainer.kl_weight(e / 4, 3, 1.0) for e in range(20)]
    assert weights == sorted(weights)


def test_a_few_steps_lower_the_validation_loss(digits_dataset):
    vae = small_vae()
    train = make_loader(subset(digits_dataset.train, 512), digits_dataset.levels, batch_size=32, shuffle=True, seed=0)
    config = trainer.TrainConfig(epochs=1, lr=3e-3)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.lr)
    before = trainer.validate(vae, digits_dataset.val, digits_dataset.levels, CPU.device, CPU, 256)
    metrics = trainer.train_one_epoch(vae, train, optimizer, CPU.device, epoch=0, config=config,
                                      generator=torch.Generator().manual_seed(0))
    after = trainer.validate(vae, digits_dataset.val, digits_dataset.levels, CPU.device, CPU, 256)
    assert set(metrics) >= {"loss", "rec", "kl", "elbo", "n"} and metrics["n"] == 512
    assert after["loss"] < before["loss"] - 1.0, (before, after)


def test_same_seed_gives_identical_weights(digits_dataset):
    a, result_a = run_training(digits_dataset, epochs=2, seed=3)
    b, result_b = run_training(digits_dataset, epochs=2, seed=3)
    c, _ = run_training(digits_dataset, epochs=2, seed=4)
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(ta, tb), name
    assert any(not torch.equal(ta, tc) for ta, tc in zip(a.state_dict().values(), c.state_dict().values()))
    assert [row["val_elbo"] for row in result_a.history] == [row["val_elbo"] for row in result_b.history]


def test_resume_continues_where_the_checkpoint_stopped(digits_dataset, tmp_path):
    full, full_result = run_training(digits_dataset, epochs=3, checkpoint_path=tmp_path / "full.ckpt")
    run_training(digits_dataset, epochs=2, checkpoint_path=tmp_path / "part.ckpt")
    checkpoint = trainer.load_checkpoint(tmp_path / "part.ckpt")
    assert checkpoint["epoch"] == 2 and len(checkpoint["history"]) == 2
    assert VAEConfig(**checkpoint["config"]) == small_vae().config
    steps_per_epoch = 256 // 32
    assert all(s["step"] == 2 * steps_per_epoch for s in checkpoint["optimizer"]["state"].values())

    resumed, resumed_result = run_training(digits_dataset, epochs=3, checkpoint_path=tmp_path / "part.ckpt",
                                           resume=checkpoint)
    assert [row["epoch"] for row in resumed_result.history] == [1, 2, 3]
    untimed = lambda history: [{k: v for k, v in row.items() if k != "time_s"} for row in history]  # noqa: E731
    assert untimed(resumed_result.history) == untimed(full_result.history)
    for (name, ta), tb in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(ta, tb), name
    after = trainer.load_checkpoint(tmp_path / "part.ckpt")
    assert after["epoch"] == 3
    assert all(s["step"] == 3 * steps_per_epoch for s in after["optimizer"]["state"].values())
    assert resumed_result.images_per_s > 0  # the one epoch this run trained
    # Resumed with nothing left to train (to evaluate or export again): the history stays, and no speed is
    # claimed for epochs that ran in another process (it read "0 images/s").
    _, nothing_left = run_training(digits_dataset, epochs=3, checkpoint_path=tmp_path / "part.ckpt", resume=after)
    assert nothing_left.epochs_run == 3 and len(nothing_left.history) == 3 and nothing_left.images_per_s is None


def test_the_moving_average_is_what_is_validated_and_kept(digits_dataset):
    """With --ema the training trajectory is unchanged; the model ends holding the average of the weights after
    every step (computed here independently, in float64, from a hook on the optimizer), and the history's
    validation ELBO is the average's."""
    trajectory = []
    decay = 0.9

    def record(optimizer, args, kwargs):
        params = [p.detach().double().clone() for group in optimizer.param_groups for p in group["params"]]
        trajectory.append(params)

    handle = register_optimizer_step_post_hook(record)
    try:
        plain, plain_result = run_training(digits_dataset, epochs=1)
    finally:
        handle.remove()
    averaged, result = run_training(digits_dataset, epochs=1, ema=decay)
    untimed = lambda history, keys: [{k: row[k] for k in keys} for row in history]  # noqa: E731
    train_keys = [k for k in result.history[0] if k.startswith("train_")]
    assert untimed(result.history, train_keys) == untimed(plain_result.history, train_keys)

    expected = trajectory[0]
    for step in trajectory[1:]:
        expected = [decay * e + (1 - decay) * p for e, p in zip(expected, step)]
    assert len(trajectory) == 256 // 32
    for (name, param), want in zip(averaged.named_parameters(), expected):
        assert torch.allclose(param.double(), want, atol=1e-6), name
    # Not the last step's weights, which the run without an average ends with.
    assert all(torch.equal(p.double(), last) for p, last in zip(plain.parameters(), trajectory[-1]))
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(averaged.parameters(), plain.parameters()))
    again = trainer.validate(averaged, subset(digits_dataset.val, 64), digits_dataset.levels, CPU.device, CPU, 256)
    assert again["elbo"] == pytest.approx(result.history[0]["val_elbo"], abs=1e-3)
    assert result.history[0]["val_elbo"] != plain_result.history[0]["val_elbo"]


def test_resume_with_a_moving_average_matches_the_run_that_never_stopped(digits_dataset, tmp_path):
    full, full_result = run_training(digits_dataset, epochs=3, ema=0.95)
    run_training(digits_dataset, epochs=2, ema=0.95, checkpoint_path=tmp_path / "part.ckpt")
    checkpoint = trainer.load_checkpoint(tmp_path / "part.ckpt")
    assert int(checkpoint["ema"]["n_averaged"]) == 2 * 256 // 32
    resumed, resumed_result = run_training(digits_dataset, epochs=3, ema=0.95, resume=checkpoint)
    assert [row["val_elbo"] for row in resumed_result.history] == [row["val_elbo"] for row in full_result.history]
    for (name, ta), tb in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(ta, tb), name


def test_early_stopping_restores_the_best_epoch(digits_dataset):
    torch.manual_seed(0)
    vae = VAE(VAEConfig(channels=1, height=8, width=8, levels=17))
    # The full-size model on 32 images at a high learning rate overfits within a few epochs, so validation
    # stops improving long before epoch 40.
    config = trainer.TrainConfig(epochs=40, batch_size=16, lr=1e-2, patience=2)
    result = trainer.train(vae, subset(digits_dataset.train, 32), digits_dataset.val, digits_dataset.levels,
                           config, CPU)
    assert result.epochs_run < 40 and result.epochs_run == result.best_epoch + 2
    assert len(result.history) == result.epochs_run
    best_row = result.history[result.best_epoch - 1]
    assert best_row["val_elbo"] == max(row["val_elbo"] for row in result.history) == result.best_val_elbo
    again = trainer.validate(vae, digits_dataset.val, digits_dataset.levels, CPU.device, CPU, 256)
    assert again["elbo"] == pytest.approx(best_row["val_elbo"], abs=1e-3)


def overfitting_run(dataset, epochs: int, **kwargs):
    """The full-size model on 32 images at a high learning rate: validation stops improving within a few epochs."""
    torch.manual_seed(0)
    vae = VAE(VAEConfig(channels=1, height=8, width=8, levels=17))
    config = trainer.TrainConfig(epochs=epochs, batch_size=16, lr=1e-2, patience=0, lr_patience=2)
    return vae, trainer.train(vae, subset(dataset.train, 32), subset(dataset.val, 64), dataset.levels, config, CPU,
                              **kwargs)


def test_the_learning_rate_halves_after_lr_patience_epochs_without_progress_and_resumes(digits_dataset, tmp_path):
    full, result = overfitting_run(digits_dataset, 12)
    rates = [row["lr"] for row in result.history]
    assert rates[0] == 1e-2 and min(rates) < 1e-2, rates
    best, best_epoch, last_change = float("-inf"), 0, 0
    for before, row in zip(result.history, result.history[1:]):  # each halving: 2 epochs without a better ELBO
        if before["val_elbo"] > best:
            best, best_epoch = before["val_elbo"], before["epoch"]
        due = before["epoch"] - max(best_epoch, last_change) >= 2
        assert row["lr"] == (before["lr"] / 2 if due else before["lr"]), (before, row)
        last_change = before["epoch"] if due else last_change
    # Stopped after a halving and resumed: the same rates and weights as the run that never stopped.
    halved_after = next(r["epoch"] for r, nxt in zip(result.history, result.history[1:]) if nxt["lr"] < r["lr"])
    overfitting_run(digits_dataset, halved_after, checkpoint_path=tmp_path / "part.ckpt")
    resumed, again = overfitting_run(digits_dataset, 12, resume=trainer.load_checkpoint(tmp_path / "part.ckpt"))
    assert [row["lr"] for row in again.history] == rates
    for (name, ta), tb in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(ta, tb), name


def test_minimal_cli_writes_artifact_report_and_figures(tmp_path, capsys):
    out = tmp_path / "run" / "vae.ts"
    assert main(["--data", "digits", "--epochs", "2", "--out", str(out)]) == 0
    _, meta = load_artifact(out)
    assert meta["training"]["epochs_run"] == 2 and meta["evaluation"]["iw_k"] == 1000
    report = json.loads((out.parent / "report.json").read_text())
    assert [row["epoch"] for row in report["history"]] == [1, 2]
    assert report["evaluation"] == meta["evaluation"]
    assert "scores" not in report["calibration"] and report["calibration"]["n"] == meta["data"]["n_calib"]
    for name in ("loss_curves.png", "reconstructions.png", "samples.png", "latents.png", "scores.png"):
        assert (out.parent / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert (out.parent / "vae.ckpt").is_file()
    printed = capsys.readouterr().out
    assert str(out) in printed and "IW-NLL" in printed and "bits/dim" in printed


def test_binarisation_fixed_for_evaluation_fresh_for_training(digits_dataset):
    val = digits_dataset.val
    once = data.binarize_once(val, digits_dataset.levels, seed=7)
    assert set(once.images.ravel().tolist()) <= {0, 1}
    assert (once.images == data.binarize_once(val, digits_dataset.levels, seed=7).images).all()
    # A pixel of intensity v/16 is on with probability v/16.
    assert abs(once.images.mean() - val.images.mean() / 16) < 0.02

    torch.manual_seed(0)
    vae = VAE(VAEConfig(channels=1, height=8, width=8, latent_dim=4, base_width=8, hidden=32,
                        likelihood="bernoulli", levels=2))
    config = trainer.TrainConfig(epochs=1, batch_size=64, binarize=True, patience=0)
    result = trainer.train(vae, subset(digits_dataset.train, 128), once, digits_dataset.levels, config, CPU,
                           val_levels=2)
    assert len(result.history) == 1 and -64 * 10 < result.history[0]["val_elbo"] < 0


@pytest.mark.parametrize("value", ["1", "1.5", "-0.1"])
def test_an_ema_decay_outside_0_1_is_a_usage_error(capsys, value):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--ema", value])
    assert exc.value.code == 2 and "--ema is a decay per step in [0, 1)" in capsys.readouterr().err
    assert parse_args(["--ema", "0.999"]).ema == 0.999 and parse_args([]).ema == 0.0


def test_resuming_warns_about_changed_settings_only(tmp_path, caplog):
    """A checkpoint written before a setting existed ran at that setting's default: no warning for it, nor for
    more --epochs (how a run is extended); a setting that really changed is named."""
    tiny = ["--data", "digits", "--device", "cpu", "--eval-k", "4", "--score-k", "4", "--latent-dim", "4",
            "--base-width", "8", "--latent-bank", "0", "--no-report", "--quiet", "--out", str(tmp_path / "vae.ts")]
    assert main([*tiny, "--epochs", "1"]) == 0
    checkpoint = trainer.load_checkpoint(tmp_path / "vae.ckpt")
    del checkpoint["train_config"]["ema"]  # as written before --ema existed
    torch.save(checkpoint, tmp_path / "old.ckpt")
    caplog.clear()
    assert main([*tiny, "--epochs", "2", "--resume", str(tmp_path / "old.ckpt")]) == 0
    assert not [r for r in caplog.records if "changed training settings" in r.getMessage()]
    assert main([*tiny, "--epochs", "3", "--lr", "1e-3", "--resume", str(tmp_path / "vae.ckpt")]) == 0
    warned = [r.getMessage() for r in caplog.records if "changed training settings" in r.getMessage()]
    assert len(warned) == 1 and "'lr': (0.002, 0.001)" in warned[0] and "epochs" not in warned[0]
