"""The client as its own distribution: installed with pip into a fresh virtual environment (no torch, no server,
nothing of the service), it talks to a real server and its results name the answering model."""

import subprocess
import sys
import textwrap

import pytest

from tests.helpers import REPO
from tests.reliability.live_server import live_server

pytestmark = pytest.mark.slow  # a fresh virtual environment and a pip install

SCRIPT = textwrap.dedent("""
    import importlib.util, sys
    import numpy as np
    from vae_client import VAEClient
    assert importlib.util.find_spec("torch") is None, "torch is installed"
    assert importlib.util.find_spec("service") is None and importlib.util.find_spec("fastapi") is None
    with VAEClient(base_url=sys.argv[1]) as vae:
        vae.wait_until_ready(60)
        sha256 = vae.model_info()["sha256"]
        samples = vae.sample(3, seed=1)
        codes = vae.encode(samples.images)
        scores = vae.anomaly_score(samples.images)
        pixels = vae.decode_array(codes.mu)
        assert codes.mu.shape == (3, 16) and pixels.shape[0] == 3 and scores.p_value.shape == (3,)
        assert {samples.model_sha256, codes.model_sha256, scores.model_sha256, pixels.model_sha256} == {sha256}
    print("ok", sha256)
""")


def test_the_client_installs_and_works_without_torch(digits_artifact, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                              str(REPO / "client")], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    with live_server(digits_artifact, tmp_path, processes=1) as server:
        done = subprocess.run([str(python), "-c", SCRIPT, server.url], capture_output=True, text=True, timeout=300,
                              cwd=tmp_path)  # not the repository: nothing of it on the path
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stdout + done.stderr
