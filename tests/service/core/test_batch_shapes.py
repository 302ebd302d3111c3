"""The runtime's batch shapes: on CPU calls run at their exact size, and on every device (CUDA where this machine
has it) rows never depend on their batch mates."""

from pathlib import Path

import numpy as np
import pytest
import torch

from service.core.runtime import ModelRuntime
from tests.helpers import FORMAT1


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

    def latent_neighbour_distance(self, x):
        self.sizes.append(("neighbours", x.shape[0]))
        return self.module.latent_neighbour_distance(x)

    def latent_log_density(self, x):
        self.sizes.append(("density", x.shape[0]))
        return self.module.latent_log_density(x)


@pytest.fixture(scope="module")
def runtime(digits_artifact):
    runtime = ModelRuntime(digits_artifact, device="cpu")
    runtime.module = Recording(runtime.module)
    runtime.warm_up(rounds=1)
    return runtime


def test_cpu_calls_run_at_the_smallest_call_size_that_holds_them(runtime):
    """Exact up to 8 rows, then at most 7 rows of padding; over the largest size, split."""
    assert runtime.call_sizes == [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 40, 48, 56, 64]
    images = np.random.default_rng(1).integers(0, 256, size=(150, 1, 8, 8), dtype=np.uint8)
    runtime.module.sizes.clear()
    runtime.encode(images[:17])
    runtime.encode(images)  # over the largest size: split into calls of at most 64
    runtime.decode(np.zeros((5, runtime.info.latent_dim), np.float32))
    runtime.encode(images[:3])
    low = runtime.exact_from
    assert runtime.module.sizes == [("encode", max(24, low["encode"])), ("encode", 64), ("encode", 64),
                                    ("encode", 24), ("decode", max(5, low["decode"])),
                                    ("encode", max(3, low["encode"]))]


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module", params=DEVICES)
def any_runtime(request, digits_artifact, runtime):
    if request.param == "cpu":
        return runtime
    on_device = ModelRuntime(digits_artifact, device=request.param)
    on_device.warm_up(rounds=1)
    return on_device


@pytest.mark.parametrize("kernel", ["encode", "decode", "score", "latent_nn", "latent_log_density"])
def test_rows_are_bit_identical_at_every_batch_size(any_runtime, digit_images, kernel):
    """Every batch size from 1 to the row limit, every row (real digits: the K weights' summation order shows
    on typical inputs, not on noise). On a GPU too, where cuDNN and cuBLAS choose kernels by shape."""
    runtime = any_runtime
    rng = np.random.default_rng(2)
    images = np.concatenate([digit_images[:40], rng.integers(0, 256, size=(30, 1, 8, 8), dtype=np.uint8)])
    latents = rng.standard_normal((70, runtime.info.latent_dim)).astype(np.float32)
    run = {
        "encode": lambda n: runtime.encode(images[:n])["mu"],
        "decode": lambda n: runtime.decode(latents[:n])["pixels"],
        "score": lambda n: np.column_stack([runtime.score(images[:n], runtime.info.score_k)[name]
                                            for name in ("iw_ll", "elbo", "rec", "kl")]),
        "latent_nn": lambda n: runtime.latent(images[:n], "latent_nn")["latent_nn"],
        "latent_log_density": lambda n: runtime.latent(images[:n], "latent_log_density")["latent_log_density"],
    }[kernel]
    limit = runtime.max_rows(kernel, runtime.info.score_k)
    reference = run(limit)
    differ = [n for n in range(1, limit + 1) if not np.array_equal(run(n), reference[:n])]
    assert not differ, f"rows of {kernel} change with the batch size at {differ}"


def test_a_kernel_whose_rows_depend_on_the_batch_size_is_padded_up_to_where_they_agree(digits_artifact):
    runtime = ModelRuntime(digits_artifact, device="cpu")
    runtime.module = Recording(runtime.module, skew_encode_at={12})  # as if 12 rows took another kernel
    runtime.warm_up(rounds=1)
    assert runtime.exact_from["encode"] == 16
    runtime.module.sizes.clear()
    for n in (1, 7, 17):
        runtime.encode(np.zeros((n, 1, 8, 8), np.uint8))
    assert runtime.module.sizes == [("encode", 16), ("encode", 16), ("encode", 24)]  # the established bits


def test_an_older_score_whose_rows_depend_on_the_batch_size_runs_at_one_size():
    """A format-1 artifact written before ``scoring.batch_invariant``: its score reduces over a (K, B) column,
    so every score call is padded to the same size; new artifacts score at the exact size."""
    runtime = ModelRuntime(FORMAT1, device="cpu")
    assert not runtime.metadata.scoring.batch_invariant
    runtime.module = Recording(runtime.module)
    runtime.warm_up(rounds=1)
    runtime.module.sizes.clear()
    k = runtime.info.score_k
    for n in (1, 2, 3):
        runtime.score(np.zeros((n, 1, 8, 8), np.uint8), k)
    cap = runtime.max_rows("score", k)
    assert runtime.module.sizes == [("score", cap)] * 3


def test_a_score_k_whose_call_size_does_not_divide_the_probe_is_not_padded_for_nothing(digits_artifact):
    """At K=10 score calls hold at most 3 rows, so calls of 1, 2 and 3 rows cover 16, 16 and 15 probe images: the
    probe compares the rows both hold, and pads only where a smaller call really gives other bits."""
    runtime = ModelRuntime(digits_artifact, device="cpu")
    runtime.warm_up(score_k=10, rounds=1)
    assert runtime.max_rows("score", 10) == 3
    padded_to = runtime.exact_from["score"]
    images = np.random.default_rng(5).integers(0, 256, size=(16, 1, 8, 8), dtype=np.uint8)
    runtime.exact_from["score"] = 1  # every call at its own size, to see what the padding avoids

    def scored_in_calls_of(n):
        return np.concatenate([runtime.score(images[i:i + n], 10)["iw_ll"] for i in range(0, 15, n)])[:15]

    largest = scored_in_calls_of(3)
    if padded_to > 1:  # the size just below the padding does give other bits ...
        assert not np.array_equal(scored_in_calls_of(padded_to - 1), largest)
    for n in range(padded_to, 4):  # ... and every size from the padding on gives the largest call's
        np.testing.assert_array_equal(scored_in_calls_of(n), largest)


def test_a_large_k_whose_calls_hold_fewer_rows_than_the_padding_runs_at_one_size(digits_artifact):
    """A K so large that a score call holds fewer rows than the probe's padding: every call at the one size
    left (not a failed request), each row as scored alone."""
    runtime = ModelRuntime(digits_artifact, device="cpu")
    runtime.module = Recording(runtime.module)
    runtime.warm_up(rounds=1)
    runtime.exact_from["score"] = 8  # as if calls below 8 rows took other kernels
    k = runtime.max_score_decodes // 4  # calls of at most 4 rows
    images = np.random.default_rng(3).integers(0, 256, size=(6, 1, 8, 8), dtype=np.uint8)
    runtime.module.sizes.clear()
    together = runtime.score(images, k)["iw_ll"]
    assert runtime.module.sizes == [("score", 4), ("score", 4)]
    alone = np.concatenate([runtime.score(images[i:i + 1], k)["iw_ll"] for i in range(6)])
    np.testing.assert_array_equal(together, alone)
