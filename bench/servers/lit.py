"""LitServe with batching on the same artifact: one LitAPI per server, ``--api encode|score|decode``.

Written as LitServe's docs show: ``decode_request`` turns one request into model input, ``predict`` gets a
list of them (``max_batch_size``, ``batch_timeout``), ``encode_response`` shapes one answer. Requests carry
several images (the .npy workload), so ``batch`` keeps the list and ``predict`` concatenates and splits.
LitServe parses multipart and JSON bodies itself and has no raw-body path, so the .npy batch arrives as a
multipart file part. Only one API per server: an idle LitServe worker polls its queue and would tax the
others. Each worker writes its batch counts to ``--stats``.PID every 0.2 s (LitServe exposes no batch-size metric).
``python -m bench.servers.lit --model vae.ts --port 8102 --api encode``.
"""

import argparse
import os
import threading
import time
from pathlib import Path
from typing import List

import litserve as ls
import numpy as np
import orjson
import torch
from fastapi import Response

from bench import common

JSON = "application/json"
PATHS = {"encode": "/encode", "score": "/anomaly-score", "decode": "/sample"}  # kernel -> endpoint


class VAEAPI(ls.LitAPI):
    def __init__(self, model_path: Path, kernel: str, threads: int, stats: Path, **kwargs) -> None:
        super().__init__(api_path=PATHS[kernel], **kwargs)
        self.model_path, self.kernel, self.threads, self.stats = model_path, kernel, threads, stats

    def setup(self, device: str) -> None:  # LitServe's device for this worker: "cpu" or "cuda:N"
        metadata = common.read_metadata(self.model_path)
        self.shape = common.model_shape(metadata)
        self.kind = common.default_kind(metadata)  # the artifact's default score kind, as our service computes it
        self.device = device
        self.module = common.load_model(self.model_path, self.threads, device)
        self.noise = common.score_noise(self.shape, self.shape.score_k, device)
        self.batches = self.rows = 0
        threading.Thread(target=self._flush_forever, name="bench-stats", daemon=True).start()

    def decode_request(self, request):
        if self.kernel == "decode":
            return int(request["n"]), int(request.get("seed") or 0)
        blobs = [part.file.read() for _, part in request.multi_items() if hasattr(part, "file")]
        if len(blobs) == 1 and blobs[0][:6] == b"\x93NUMPY":
            return common.decode_npy(blobs[0], self.shape)
        return np.stack([common.decode_png(b, self.shape) for b in blobs])

    def batch(self, inputs: List) -> List:
        return inputs  # requests carry several rows each: predict concatenates and splits

    def predict(self, inputs: List) -> List[bytes]:
        with torch.inference_mode():
            if self.kernel == "decode":
                out = [self._sample(n, seed) for n, seed in inputs]
                self._count(sum(n for n, _ in inputs))
                return out
            sizes = [len(x) for x in inputs]
            x = common.to_tensor(np.concatenate(inputs), self.device)
            self._count(len(x))
            if self.kernel == "encode":
                mu, logvar = (common.to_numpy(t) for t in self.module.encode(x))
                return [common.encode_body(m, v) for m, v in zip(common.split_rows(mu, sizes),
                                                                  common.split_rows(logvar, sizes))]
            outputs = common.run_score(self.module, x, self.noise, self.kind.latent_needs)
            outputs["bits"] = self.kind.bits(np.concatenate(inputs))
            parts = {name: common.split_rows(v, sizes) if v is not None else [None] * len(sizes)
                     for name, v in outputs.items()}
            return [common.anomaly_body({name: parts[name][i] for name in parts if name != "bits"}, self.shape,
                                        self.kind, self.shape.score_k, parts["bits"][i]) for i in range(len(sizes))]

    def unbatch(self, output: List[bytes]) -> List[bytes]:
        return output

    def encode_response(self, output: bytes) -> Response:
        return Response(output, media_type=JSON)

    def _sample(self, n: int, seed: int) -> bytes:
        z = np.random.default_rng(seed).standard_normal((n, self.shape.latent_dim)).astype(np.float32)
        pixels = common.to_numpy(self.module.decode(torch.from_numpy(z).to(self.device)))
        return common.sample_body(pixels, z, seed)

    def _count(self, rows: int) -> None:
        self.batches += 1
        self.rows += rows

    def _flush_forever(self) -> None:
        final = Path(f"{self.stats}.{os.getpid()}")  # one file per worker process; the runner sums them
        tmp = Path(f"{final}.tmp")
        while True:
            tmp.write_bytes(orjson.dumps({"batches": self.batches, "rows": self.rows}))
            tmp.replace(final)
            time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--api", choices=tuple(PATHS), required=True, help="the batcher kernel: its endpoint")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--batch-timeout-ms", type=float, default=0.0)
    parser.add_argument("--workers", type=int, default=1, help="LitServe workers_per_device (processes)")
    parser.add_argument("--fast-queue", action="store_true", help="LitServe's ZeroMQ transport")
    parser.add_argument("--accelerator", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--stats", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    api = VAEAPI(args.model, args.api, args.threads, args.stats, max_batch_size=args.max_batch_size,
                 batch_timeout=args.batch_timeout_ms / 1000.0)
    server = ls.LitServer(api, accelerator=args.accelerator, workers_per_device=args.workers,
                          healthcheck_path="/readyz", fast_queue=args.fast_queue, timeout=60)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, log_level="warning",
               generate_client_file=False, access_log=False)


if __name__ == "__main__":
    main()
