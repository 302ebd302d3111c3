"""The runtime's batch shapes on CPU: calls run at their exact size, yet rows never depend on their batch mates."""

import numpy as np
import pytest

from service.runtime import ModelRuntime


class Recording:
    """Wraps the artifact's module: records the batch size of every call; ``skew`` perturbs chosen sizes."""

    def __init__(self, module, skew_encode_at=()):
        self.module, self.skew = module, set(skew_encode_at)
        self.sizes = []

    def encode(self, x):
        self.sizes.append(("encode", x.shape[0]))
        mu, logvar = self.module.encode(x)
        return (mu + 1e-6, logvar) if x.shape[0] in self.skew else (mu, logvar)

    def decode(self, z):
        self.sizes.append(("decode", z.shape[0]))
        return self.module.decode(z)

    def score(self, x, eps):
        self.sizes.append(("score", x.shape[0]))
        return self.module.score(x, eps)


@pytest.fixture(scope="module")
def runtime(digits_artifact):
    runtime = ModelRuntime(digits_artifact, device="cpu")
    runtime.module = Recording(runtime.module)
    runtime.warm_up(rounds=1)
    return runtime


def test_cpu_calls_run_at_their_exact_size(runtime):
    assert all(isinstance(n, int) for n in runtime.exact_from.values()), runtime.exact_from
    images = np.random.default_rng(1).integers(0, 256, size=(150, 1, 8, 8), dtype=np.uint8)
    runtime.module.sizes.clear()
    runtime.encode(images[:17])
    runtime.encode(images)  # over the largest bucket: split into calls of at most 64
    runtime.decode(np.zeros((5, runtime.info.latent_dim), np.float32))
    low = runtime.exact_from["encode"]
    assert runtime.module.sizes == [("encode", max(17, low)), ("encode", 64), ("encode", 64), ("encode", 22),
                                    ("decode", max(5, runtime.exact_from["decode"]))]


@pytest.mark.parametrize("kernel", ["encode", "decode", "score"])
def test_rows_are_bit_identical_at_every_batch_size(runtime, kernel):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(70, 1, 8, 8), dtype=np.uint8)
    latents = rng.standard_normal((70, runtime.info.latent_dim)).astype(np.float32)
    run = {
        "encode": lambda n: runtime.encode(images[:n])["mu"],
        "decode": lambda n: runtime.decode(latents[:n])["pixels"],
        "score": lambda n: runtime.score(images[:n], runtime.info.score_k)["log_w"],
    }[kernel]
    alone = run(1)[0]
    sizes = range(2, 71) if kernel != "score" else range(2, 20)
    differ = [n for n in sizes if not np.array_equal(run(n)[0], alone)]
    assert not differ, f"row 0 of {kernel} changes with the batch size at {differ}"


def test_a_kernel_whose_rows_depend_on_the_batch_size_is_padded_to_buckets(digits_artifact):
    runtime = ModelRuntime(digits_artifact, device="cpu")
    runtime.module = Recording(runtime.module, skew_encode_at={7})  # as if 7 rows took another kernel
    runtime.warm_up(rounds=1)
    assert runtime.exact_from["encode"] is None and runtime.exact_from["decode"] is not None
    runtime.module.sizes.clear()
    runtime.encode(np.zeros((7, 1, 8, 8), np.uint8))
    assert runtime.module.sizes == [("encode", 16)]  # padded to the bucket, where the rows are the established ones
