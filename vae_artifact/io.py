"""Save and load the artifact: a TorchScript module with metadata.json embedded.

``save_artifact`` checks the metadata, stamps the weights hash and writes atomically (readers never see half a file);
``load_artifact`` refuses, with the reason, a missing, unreadable, newer-format, schema-breaking, method-lacking or
tampered file. TorchScript is deprecated from torch 2.11 on and warns on script, save and load; the design
keeps the format, so exactly those warnings are silenced, here and nowhere else.
"""

import hashlib
import json
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple, Union

import torch

from vae_artifact.errors import ArtifactError
from vae_artifact.metadata import KERNELS, METADATA_FILE, Metadata

Device = Union[str, torch.device]


@contextmanager
def quiet_torchscript() -> Iterator[None]:
    """Silence torch's TorchScript deprecation warnings (and only those) for a block."""
    with warnings.catch_warnings():
        for category in (DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", message=r".*(TorchScript|torch\.jit).*", category=category)
        yield


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 over the state dict: per entry, sorted by name, ``name|dtype|shape|`` and the raw bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of the artifact file's bytes (what ``VAE_EXPECTED_SHA256`` pins)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_artifact(module: torch.jit.ScriptModule, path: Path, metadata: Dict[str, Any]) -> Metadata:
    """Write ``module`` with ``metadata`` (its ``weights_sha256`` set from the module) to ``path`` atomically.
    Returns the checked metadata as it was written."""
    document = json.loads(json.dumps(dict(metadata, weights_sha256=weights_sha256(module)), allow_nan=False))
    checked = Metadata.from_dict(document, str(path))  # a writer never writes what a reader would refuse
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with quiet_torchscript():
        torch.jit.save(module, str(tmp), _extra_files={METADATA_FILE: json.dumps(document, indent=1)})
    os.replace(tmp, path)  # readers never see a half-written artifact
    return checked


def load_artifact(path: Path, map_location: Device = "cpu",
         expected_sha256: Optional[str] = None) -> Tuple[torch.jit.ScriptModule, Metadata]:
    """The one loader: the module (eval mode, on ``map_location``) and its checked metadata. With
    ``expected_sha256`` the file's bytes must have that hash (a pinned deployment)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"model artifact not found: {path} (no such artifact file)")
    if expected_sha256:
        sha = file_sha256(path)
        if sha != expected_sha256.lower():
            raise ArtifactError(f"{path}: sha256 {sha} is not the pinned {expected_sha256}")
    extra = {METADATA_FILE: ""}
    try:
        with quiet_torchscript():
            module = torch.jit.load(str(path), map_location=map_location, _extra_files=extra)
    except Exception as exc:  # damaged zips raise RuntimeError, ValueError or zipfile errors
        raise ArtifactError(f"{path}: not a readable TorchScript artifact ({type(exc).__name__}: {exc})") from exc
    try:
        document = json.loads(extra[METADATA_FILE] or "null")
    except ValueError as exc:
        raise ArtifactError(f"{path}: embedded metadata.json is not valid JSON ({exc})") from exc
    metadata = Metadata.from_dict(document, str(path))
    missing = [name for name in KERNELS if not hasattr(module, name)]
    if missing:
        raise ArtifactError(f"{path}: artifact does not export {missing} (needs {list(KERNELS)})")
    if metadata.weights_sha256 != weights_sha256(module):
        raise ArtifactError(f"{path}: weights do not match the weights_sha256 in its metadata (corrupt or tampered)")
    return module.eval(), metadata
