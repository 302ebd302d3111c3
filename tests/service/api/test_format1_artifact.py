"""An artifact written before the contract had its own package (format 1, by main at baf6226) still loads and
serves: every reader goes through ``vae_artifact``, and it must keep reading what was already deployed.

``tests/fixtures/vae_format1.ts`` was made with that commit's CLI:
``python -m training --data digits --epochs 1 --eval-k 8 --score-k 8 --base-width 8 --latent-dim 4 --no-report``.
"""

from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from tests.helpers import FORMAT1, png, wait_ready
from vae_artifact.io import load_artifact
from vae_artifact.metadata import read_metadata



def test_format1_metadata_reads_with_and_without_torch():
    module, meta = load_artifact(FORMAT1)
    assert meta.format_version == 1 and meta == read_metadata(FORMAT1)
    assert (meta.image.channels, meta.image.height, meta.image.width, meta.latent_dim) == (1, 8, 8, 4)
    assert meta.levels == 17 and meta.scoring.k == 8 and meta.calibration.n == 144
    assert set(meta.calibration.scores) == {"nll", "nll-minus-png", "nll-minus-zlib", "nll-minus-bz2"}


def test_format1_artifact_serves_every_endpoint(digit_images):
    with TestClient(create_app(Settings(model_path=FORMAT1))) as client:
        wait_ready(client)
        files = [("file", (f"{i}.png", png(image), "image/png")) for i, image in enumerate(digit_images[:3])]
        encoded = client.post("/encode", files=files)
        assert encoded.status_code == 200 and np.asarray(encoded.json()["mu"]).shape == (3, 4)
        decoded = client.post("/decode", json={"z": encoded.json()["mu"]})
        assert decoded.status_code == 200 and len(decoded.json()["images"]) == 3
        assert client.post("/sample", json={"n": 2, "seed": 1}).status_code == 200
        scored = client.post("/anomaly-score", files=files)
        assert scored.status_code == 200, scored.text
        body = scored.json()
        assert body["k"] == 8 and body["score"] == "nll-minus-bz2" and body["calibration"]["n"] == 144
        assert all(0 < row["p_value"] <= 1 for row in body["scores"])
        model = client.get("/v1/model").json()
        assert model["metadata"]["format_version"] == 1 and model["latent_dim"] == 4
