"""Replacing the served model in place: ``POST /v1/model/reload`` and SIGHUP.

Each server process loads the new artifact beside the old one, checks it exactly as at start-up (format, hashes,
calibration, the call-size probe), warms it on a thread of its own while the old one keeps serving, then switches:
one reference assignment, ``state.model``. A request reads the model once, when it is admitted, and the batcher
never puts rows of two models in one call, so every request is answered wholly by one model and those admitted
before the switch finish on theirs; readiness never drops. A refused artifact changes nothing. A process holds at
most one model beyond the one it serves: a reload first waits until the model it retired last has been released.

With several server processes the one that took the request loads first, so a refused file is refused before any
other process spends anything on it; then it records the new model for the others (and for processes started
later), asks the supervisor to pass the reload on (SIGUSR1; the supervisor sends every process SIGHUP), and
answers once every live process serves the new model. Reloads are serialised across processes by a file lock.
"""

import asyncio
import gc
import logging
import os
import signal
import time
import weakref
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from service.api.deps import ServiceState
from service.core import reloading
from service.core.reloading import ArtifactRefused, ReloadDisabled, ReloadIncomplete
from service.core.devices import release_free_memory
from service.core.errors import InvalidInput
from service.core.metrics import processes_serving
from service.core.runtime import ArtifactError, ModelRuntime
from service.core.served import ServedModel
from vae_artifact.io import file_sha256

log = logging.getLogger(__name__)

POLL_S = 0.05


@dataclass(frozen=True)
class Reloaded:
    sha256: str
    previous_sha256: str
    processes: int  # server processes that serve ``sha256`` now

    def to_dict(self) -> dict:
        return {"sha256": self.sha256, "previous_sha256": self.previous_sha256, "processes": self.processes}


async def reload(state: ServiceState, path: Optional[str] = None) -> Reloaded:
    """Serve the artifact at ``path`` (inside the model directory; None: the configured model's path again) in
    every server process. Raises ReloadDisabled, PathNotAllowed, ArtifactNotFound, ArtifactRefused,
    ReloadInProgress or ReloadIncomplete; changes nothing unless it returns."""
    settings = state.settings
    if not settings.allow_reload:
        raise ReloadDisabled("reloading the model is off: start the server with VAE_ALLOW_RELOAD=true")
    target = configured(state) if path is None else reloading.resolve(settings.reload_dir, path)
    shared = shared_dir(state)
    if state.reload_lock.locked():
        raise reloading.ReloadInProgress("another reload is running")
    async with state.reload_lock:
        with reloading.held(shared) if shared is not None else nullcontext():
            previous = state.model.info.sha256
            sha256 = await swap_in(state, target)
            if shared is None:
                return Reloaded(sha256, previous, 1)
            if sha256 != previous:
                model = reloading.ModelFile(str(target), sha256)
                reloading.write(shared, reloading.CURRENT, model)  # what a process started from now on loads
                reloading.write(shared, reloading.REQUEST, model)
                os.kill(os.getppid(), signal.SIGUSR1)  # the supervisor sends every process SIGHUP
            return Reloaded(sha256, previous, await all_serving(state, sha256))


async def on_hangup(state: ServiceState) -> None:
    """SIGHUP: load what the server was asked to reload (the shared request, with several processes; else the
    configured path). In the process that took an HTTP reload it finds the model already served."""
    if not state.settings.allow_reload:
        log.warning("SIGHUP: reloading the model is off (VAE_ALLOW_RELOAD); ignored")
        return
    request = reloading.read(shared_dir(state), reloading.REQUEST)
    target = Path(request.path) if request is not None else configured(state)
    if state.reload_lock.locked():
        log.info("SIGHUP: a reload is already running in this process")
        return
    async with state.reload_lock:
        try:
            sha256 = await swap_in(state, target, expected=request.sha256 if request is not None else None)
        except (InvalidInput, ArtifactError) as exc:
            log.error("SIGHUP: reload of %s refused, the model in use keeps serving: %s", target, exc)
            return
        shared = shared_dir(state)
        if shared is not None and (request is None or request.sha256 is None):  # the supervisor's own SIGHUP
            reloading.write(shared, reloading.CURRENT, reloading.ModelFile(str(target), sha256))


async def swap_in(state: ServiceState, target: Path, expected: Optional[str] = None) -> str:
    """Load, check and warm ``target`` beside the model in use, then switch this process to it; its sha256. The
    model in use stays when the file is the same (by sha256) or is refused. ``expected``: the file's sha256 as
    the process that took the reload found it (a file changed since is refused)."""
    settings, metrics, current = state.settings, state.metrics, state.model
    if await asyncio.to_thread(file_sha256, target) == current.info.sha256:
        metrics.reloads.labels("unchanged").inc()
        log.info("reload: %s is the model in use (sha256 %s)", target, current.info.sha256[:12])
        return current.info.sha256
    await released(state)
    started = time.monotonic()
    try:
        runtime = await asyncio.to_thread(_load_and_warm, target, settings, expected or settings.expected_sha256)
    except ArtifactError as exc:
        metrics.reloads.labels("refused").inc()
        raise ArtifactRefused(f"{target.name}: {str(exc).replace(str(target), target.name)}") from exc
    except Exception as exc:  # a warm-up that crashes refuses the file the same way
        metrics.reloads.labels("failed").inc()
        log.exception("reload: %s failed its warm-up", target)
        raise ArtifactRefused(f"{target.name} failed its warm-up: {type(exc).__name__}: {exc}") from exc
    new = ServedModel.of(runtime, max_pixels=settings.max_pixels)
    state.model = new  # the switch: requests admitted from here on are answered by the new model
    metrics.serving(new.info, str(runtime.device), previous=current.info)
    metrics.reloads.labels("switched").inc()
    state.retired = weakref.ref(current.runtime)
    log.info("reload: serving %s (sha256 %s) after %.2f s; %s retired", target, new.info.sha256[:12],
             time.monotonic() - started, current.info.sha256[:12])
    del current
    asyncio.get_running_loop().create_task(_release(state))
    return new.info.sha256


def _load_and_warm(target: Path, settings, expected: Optional[str]) -> ModelRuntime:
    runtime = ModelRuntime(target, device=settings.device, buckets=settings.buckets,
                           max_score_decodes=settings.max_score_decodes, expected_sha256=expected)
    runtime.warm_up()
    return runtime


async def released(state: ServiceState) -> None:
    """Wait until the model retired last is gone (its last requests finish within their deadlines), so that a
    process never holds more than one model beyond the one it serves."""
    deadline = time.monotonic() + state.settings.request_timeout_s + 5.0
    while state.retired is not None and state.retired() is not None:
        if time.monotonic() > deadline:
            log.warning("reload: the retired model is still referenced; loading the next one anyway")
            return
        await asyncio.sleep(POLL_S)


async def _release(state: ServiceState) -> None:
    """Once the retired model's last request is done, hand its memory back to the system."""
    await released(state)
    gc.collect()  # TorchScript modules and their tensors can sit in reference cycles
    await asyncio.to_thread(release_free_memory)


async def all_serving(state: ServiceState, sha256: str) -> int:
    """Wait until every server process serves ``sha256``; how many do. ReloadIncomplete after a while."""
    expected, shared = state.settings.processes or 1, shared_dir(state)
    deadline = time.monotonic() + 120.0
    while True:
        serving = processes_serving(sha256, shared)
        if serving >= expected:
            return serving
        if time.monotonic() > deadline:
            raise ReloadIncomplete(f"{serving} of {expected} server processes serve {sha256[:12]}; the others "
                                   "still serve the model before (their logs say why)")
        await asyncio.sleep(POLL_S)


def configured(state: ServiceState) -> Path:
    path = state.settings.model_path
    if not path.is_file():
        raise reloading.ArtifactNotFound(f"no artifact at the configured path {path}")
    return path


def shared_dir(state: ServiceState) -> Optional[Path]:
    """The directory the server processes share, or None when this process is the whole server."""
    settings = state.settings
    return settings.metrics_dir if settings.metrics_dir is not None and (settings.processes or 1) > 1 else None
