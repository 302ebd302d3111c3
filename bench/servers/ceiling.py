"""The ceiling: the service's HTTP stack (FastAPI + uvicorn) parsing and decoding the same bodies, no model.

Each endpoint reads the body like the others (.npy, JSON, and multipart PNG parts, split on their boundary:
the cheapest parse there is), decodes the images on the event loop (the cheapest place for a 28x28 PNG) and
returns a precomputed body of the right shape and size. It runs as many
uvicorn processes as our service runs server processes (``--processes``). Nothing a model server does can be
faster on this stack. Also serves ``GET /constant`` (no body parsing at all), which the benchmark uses to
show the load generator's own limit.
``python -m bench.servers.ceiling --model vae.ts --port 8103 --processes 2``.
"""

import argparse
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import uvicorn
from fastapi import FastAPI, Request, Response

from bench import common

JSON = "application/json"


def create_app(model_path: Path) -> FastAPI:
    metadata = common.read_metadata(model_path)
    shape = common.model_shape(metadata)
    kind = common.default_kind(metadata)
    d, k = shape.latent_dim, shape.score_k
    app = FastAPI()

    @lru_cache(maxsize=None)
    def encode_body(n: int) -> bytes:
        return common.encode_body(np.zeros((n, d), np.float32), np.zeros((n, d), np.float32))

    @lru_cache(maxsize=None)
    def score_body(n: int) -> bytes:
        zeros = np.zeros(n, np.float32)
        outputs = {"iw_ll": zeros, "elbo": zeros, "rec": zeros, "kl": zeros, "log_w": np.zeros((n, k), np.float32),
                   **{output: zeros for output in kind.latent_needs}}
        bits = None if kind.compressor is None else np.zeros(n)  # the same body size, no compression work
        return common.anomaly_body(outputs, shape, kind, k, bits)

    @lru_cache(maxsize=None)
    def sample_body(n: int) -> bytes:
        return common.sample_body(np.zeros((n, shape.channels, shape.height, shape.width), np.float32),
                                  np.zeros((n, d), np.float32), 0)

    async def read_images(request: Request) -> np.ndarray:
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            blobs = common.multipart_files(await request.body(), content_type)
            return np.stack([common.decode_png(b, shape) for b in blobs])
        return common.decode_npy(await request.body(), shape)

    @app.post("/encode")
    async def encode(request: Request) -> Response:
        return Response(encode_body(len(await read_images(request))), media_type=JSON)

    @app.post("/anomaly-score")
    async def score(request: Request) -> Response:
        return Response(score_body(len(await read_images(request))), media_type=JSON)

    @app.post("/sample")
    async def sample(request: Request) -> Response:
        return Response(sample_body(int((await request.json())["n"])), media_type=JSON)

    @app.get("/constant")
    async def constant() -> Response:
        return Response(b'{"status":"ok"}', media_type=JSON)

    @app.get("/readyz")
    async def readyz() -> dict:
        return {"status": "ready"}

    return app


def app_from_env() -> FastAPI:
    """uvicorn's factory in each of its worker processes: the model path comes through the environment."""
    return create_app(Path(os.environ["BENCH_CEILING_MODEL"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--processes", type=int, default=1, help="uvicorn worker processes")
    args = parser.parse_args()
    os.environ["BENCH_CEILING_MODEL"] = str(args.model)
    uvicorn.run("bench.servers.ceiling:app_from_env", factory=True, workers=args.processes, host="127.0.0.1",
                port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
