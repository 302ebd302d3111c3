"""The baseline a competent user writes: FastAPI + uvicorn, one model call per request, no batching.

The model runs under ``torch.inference_mode()`` in FastAPI's thread pool (never on the event loop); bodies
are parsed the same way as the service (multipart PNG parts or one .npy batch; JSON for /sample) and the
responses have the service's JSON shape. ``python -m bench.servers.naive --model vae.ts --port 8101``.
"""

import argparse
from pathlib import Path

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from bench import common

JSON = "application/json"


def create_app(model_path: Path, threads: int, device: str = "cpu") -> FastAPI:
    metadata = common.read_metadata(model_path)
    shape = common.model_shape(metadata)
    kind = common.default_kind(metadata)  # the artifact's default score kind, as our service computes it
    module = common.load_model(model_path, threads, device)
    noise = common.score_noise(shape, shape.score_k, device)
    app = FastAPI()

    async def read_images(request: Request) -> np.ndarray:
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            async with request.form() as form:
                blobs = [await f.read() for _, f in form.multi_items() if isinstance(f, UploadFile)]
            return np.stack([common.decode_png(b, shape) for b in blobs])
        return common.decode_npy(await request.body(), shape)

    def encode(images: np.ndarray) -> bytes:
        with torch.inference_mode():
            mu, logvar = module.encode(common.to_tensor(images, device))
        return common.encode_body(common.to_numpy(mu), common.to_numpy(logvar))

    def score(images: np.ndarray) -> bytes:
        with torch.inference_mode():
            outputs = common.run_score(module, common.to_tensor(images, device), noise, kind.latent_needs)
        return common.anomaly_body(outputs, shape, kind, shape.score_k, kind.bits(images))

    def sample(n: int, seed: int) -> bytes:
        z = np.random.default_rng(seed).standard_normal((n, shape.latent_dim)).astype(np.float32)
        with torch.inference_mode():
            pixels = common.to_numpy(module.decode(torch.from_numpy(z).to(device)))
        return common.sample_body(pixels, z, seed)

    @app.post("/encode")
    async def encode_route(request: Request) -> Response:
        images = await read_images(request)
        return Response(await run_in_threadpool(encode, images), media_type=JSON)

    @app.post("/anomaly-score")
    async def score_route(request: Request) -> Response:
        images = await read_images(request)
        return Response(await run_in_threadpool(score, images), media_type=JSON)

    @app.post("/sample")
    async def sample_route(request: Request) -> Response:
        body = await request.json()
        return Response(await run_in_threadpool(sample, int(body["n"]), int(body.get("seed") or 0)), media_type=JSON)

    @app.get("/readyz")
    async def readyz() -> dict:
        return {"status": "ready"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    args = parser.parse_args()
    uvicorn.run(create_app(args.model, args.threads, args.device), host="127.0.0.1", port=args.port,
                log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
