"""Two CPU processes under torchrun (gloo) train together and rank 0 alone writes one loadable artifact."""

import os
import subprocess
import sys

from vae_artifact.io import load_artifact


def test_torchrun_two_processes_write_one_artifact(tmp_path):
    out = tmp_path / "vae.ts"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "training", "--data", "digits", "--epochs", "2", "--device", "cpu", "--eval-k", "16",
           "--no-report", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # two processes on a small machine: no oversubscription
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae.ckpt", "vae.ts"]
    _, meta = load_artifact(out)
    assert meta["training"]["world_size"] == 2 and meta["training"]["epochs_run"] == 2
    assert proc.stdout.count("artifact ") == 1  # only rank 0 evaluates and prints the summary
