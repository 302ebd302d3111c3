"""Replacing the served model: which files a reload may load, and what the server processes share about it.

A reload names an artifact inside the model directory (a relative path is taken inside it; nothing may resolve
outside it, through ``..`` or a symbolic link). With several server processes, three small files in their
shared directory (the metrics directory) carry a reload from one process to the others:

- ``reload.lock``: held for the whole of one reload, so reloads are serialised across processes;
- ``reload.json``: what to load, written before the supervisor is asked to pass a reload on (SIGHUP);
- ``model.json``: the model the server serves now, read by a process that starts later (a replacement), so
  that it serves the current model and not the one the server started with.

Torch-free: the supervisor uses it.
"""

import fcntl
import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

from service.core.errors import InvalidInput

LOCK, REQUEST, CURRENT = "reload.lock", "reload.json", "model.json"


class PathNotAllowed(InvalidInput):
    """A reload path outside the model directory."""

    code = "path_not_allowed"


class ArtifactNotFound(InvalidInput):
    code = "model_not_found"


class ReloadDisabled(InvalidInput):
    code = "reload_disabled"


class ArtifactRefused(InvalidInput):
    """The new artifact failed a check or its warm-up; the old one keeps serving."""

    code = "artifact_refused"


class ReloadInProgress(Exception):
    """Another reload runs now; this one was not started."""


class ReloadIncomplete(Exception):
    """The process that took the reload switched, but not every server process did in time."""


@dataclass(frozen=True)
class ModelFile:
    """An artifact by its path, and its sha256 once known."""

    path: str
    sha256: Optional[str] = None


def resolve(model_dir: Path, given: str) -> Path:
    """``given`` (relative: inside ``model_dir``) as a resolved path inside ``model_dir``; PathNotAllowed for
    anything else (``..`` anywhere, a symbolic link or an absolute path leading out), ArtifactNotFound when no
    file is there."""
    if not given or "\x00" in given:
        raise PathNotAllowed("give the artifact's path inside the model directory")
    if ".." in Path(given).parts:
        raise PathNotAllowed(f"{given!r}: '..' is not allowed in a reload path")
    root = model_dir.resolve()
    target = (root / given).resolve()  # follows symbolic links: one that leads out is caught below
    if target != root and root not in target.parents:
        raise PathNotAllowed(f"{given!r} is outside the model directory")
    if not target.is_file():
        raise ArtifactNotFound(f"no artifact at {given!r} in the model directory")
    return target


@contextmanager
def held(shared: Path) -> Iterator[None]:
    """The reload lock of the processes sharing ``shared``, held for the block; ReloadInProgress at once if
    another process holds it."""
    with open(shared / LOCK, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ReloadInProgress("another reload is running") from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write(shared: Path, name: str, model: ModelFile) -> None:
    """Write one of the shared files atomically (a reader never sees half of it)."""
    partial = shared / f".{name}.{os.getpid()}"
    partial.write_text(json.dumps(asdict(model)))
    os.replace(partial, shared / name)


def read(shared: Optional[Path], name: str) -> Optional[ModelFile]:
    if shared is None:
        return None
    try:
        data = json.loads((shared / name).read_text())
    except (OSError, ValueError):
        return None
    return ModelFile(str(data["path"]), data.get("sha256"))
