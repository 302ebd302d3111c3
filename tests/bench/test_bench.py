"""The benchmark on the public surface: its peers do the service's work (the same scores for the same images),
and the whole bench runs, every server and every workload, in a tiny mode, so a change that breaks it fails
here and not on the day of a measurement."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from bench.servers import naive
from bench.workloads import WORKLOADS
from service.app import create_app
from service.config import Settings

REPO = Path(__file__).resolve().parents[2]


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image[0]).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_naive_peer_scores_like_the_service(digits_artifact, digit_images):
    """Its /anomaly-score rows, computed with the artifact and the contract's own math (no service code), are the
    service's for the same images: the comparison is of the same work."""
    files = [("file", (f"{i}.png", png(image), "image/png")) for i, image in enumerate(digit_images[:6])]
    with TestClient(create_app(Settings(model_path=digits_artifact, device="cpu"))) as ours:
        while ours.get("/readyz").status_code != 200:
            pass
        expected = ours.post("/anomaly-score", files=files).json()
    got = TestClient(naive.create_app(digits_artifact, threads=1)).post("/anomaly-score", files=files).json()
    assert got["score"] == expected["score"] and got["k"] == expected["k"]
    assert got["calibration"] == expected["calibration"]
    for mine, theirs in zip(got["scores"], expected["scores"]):
        assert mine.keys() == theirs.keys()
        for key, value in theirs.items():
            expected_value = value if value is None or isinstance(value, bool) else pytest.approx(value, rel=1e-4)
            assert mine[key] == expected_value, key


@pytest.mark.timeout(600)
def test_the_whole_bench_runs_in_a_tiny_mode(digits_artifact, tmp_path):
    out = tmp_path / "bench"
    command = [sys.executable, "-m", "bench", "--model", str(digits_artifact), "--out", str(out), "--duration", "0.5",
               "--warmup", "0.1", "--open-loop", "0.5", "--cold-starts", "1", "--lit-workers", "1",
               "--max-requests", "400"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    for workload in WORKLOADS:
        for server in ("ours", "naive", "litserve-1w", "ceiling"):
            run = results["runs"][workload.name][server]
            assert run["probe_ok"] and run["error_count"] == 0 and run["req_per_s"] > 0, (workload.name, server, run)
    assert results["ours"]["cold_start_s"] and not any(results["ours"]["half_load"]["errors"].values())
    assert results["inprocess"]["encode"] and results["targets"]
    report = (out / "results.md").read_text()
    assert "| /encode c=64: ours / naive (req/s)" in report


def test_the_score_kinds_cost_prices_every_kind_against_the_default(digits_artifact):
    command = [sys.executable, "-m", "bench.score_kinds_cost", "--model", str(digits_artifact), "--images", "digits",
               "--rows", "4", "--rounds", "2"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in done.stdout.splitlines() if line.startswith("| ") and not line.startswith("| kind")}
    assert "default kind: density-bz2" in done.stdout
    assert {"nll", "fisher-bz2-nn", "density-bz2"} <= rows.keys()
    assert rows["density-bz2"][-2] == "1.000x" and rows["fisher-bz2-nn"][-1] == "1.000x"
    assert float(rows["density-bz2"][1]) > 0 and float(rows["nll"][1]) == 0  # the density's encoder pass, priced
