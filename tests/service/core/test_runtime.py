"""The service refuses artifacts it cannot trust, with a clear message and a non-zero exit."""

import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from service.core.runtime import ArtifactError, ModelRuntime


def serve(*args, env=None):
    return subprocess.run([sys.executable, "-m", "service", *args, "--port", "0"], capture_output=True, text=True,
                          timeout=60, env=env)


def rewrite_metadata(src, dst, edit):
    """Copy a TorchScript zip, changing its embedded metadata.json."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for entry in zin.infolist():
            data = zin.read(entry.filename)
            if entry.filename.endswith("extra/metadata.json"):
                meta = json.loads(data)
                edit(meta)
                data = json.dumps(meta).encode()
            zout.writestr(entry, data)


@pytest.fixture
def broken(tmp_path, digits_artifact):
    def make(kind):
        path = tmp_path / f"{kind}.ts"
        raw = digits_artifact.read_bytes()
        if kind == "truncated":
            path.write_bytes(raw[: len(raw) // 2])
        elif kind == "garbage":
            path.write_bytes(np.random.default_rng(0).bytes(4096))
        elif kind == "newer":
            rewrite_metadata(digits_artifact, path, lambda m: m.update(format_version=99))
        elif kind == "tampered":
            rewrite_metadata(digits_artifact, path, lambda m: m.update(weights_sha256="0" * 64))
        elif kind == "missing":
            pass
        return path

    return make


@pytest.mark.parametrize("kind, message", [
    ("missing", "not found"),
    ("truncated", "not a readable TorchScript artifact"),
    ("garbage", "not a readable TorchScript artifact"),
    ("newer", "newer than this service supports"),
    ("tampered", "weights do not match"),
])
def test_bad_artifacts_are_refused(broken, kind, message):
    path = broken(kind)
    with pytest.raises(ArtifactError, match=message):
        ModelRuntime(path, device="cpu")
    result = serve("--model", str(path))
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_pinned_sha256_must_match(digits_artifact):
    with pytest.raises(ArtifactError, match="is not the pinned"):
        ModelRuntime(digits_artifact, device="cpu", expected_sha256="a" * 64)


def test_unavailable_device_is_refused(digits_artifact):
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ArtifactError, match="CUDA is not available"):
        ModelRuntime(digits_artifact, device="cuda")


def test_invalid_settings_exit_with_a_message(digits_artifact):
    result = serve("--model", str(digits_artifact), "--device", "tpu")
    assert result.returncode == 2 and "device must be" in result.stderr
