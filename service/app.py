"""The FastAPI application: factory and lifespan (load the artifact, start the batcher, warm up, drain).

The app assembles the two HTTP faces of the one served model: our API (``service.api``) and the Open Inference
Protocol (``service.oip``), behind the same middleware, batcher, limits and key.
"""

import asyncio
import logging
import signal
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable, Optional

import torch
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline

from service.api import openapi, reload
from service.api.deps import ServiceState
from service.api.errors import install_handlers
from service.api.middleware import ApiKeyRequired, BodyLimit, InFlightLimit, ModelHeader, RequestMetrics
from service.api.routes import anomaly, edit, inference, ops, ui
from service.api.routing import RouteTable
from service.config import Settings
from service.core.batching import Batcher
from service.core.devices import default_torch_threads, default_workers, release_free_memory
from service.core.metrics import Metrics
from service.core.runtime import KERNELS, ModelRuntime
from service.core.served import ServedModel
from service.oip import routes as oip

log = logging.getLogger(__name__)


def create_app(settings: Optional[Settings] = None, runtime: Optional[ModelRuntime] = None) -> FastAPI:
    """Build the app. Pass ``runtime`` to reuse an already loaded artifact (the CLI does, to fail fast)."""
    settings = settings or Settings()
    state = ServiceState(settings=settings, metrics=Metrics(multiprocess_dir=settings.metrics_dir))
    # FastAPIOffline serves the Swagger UI assets itself: /docs works with no internet access.
    app = FastAPIOffline(
        title="VAE inference service",
        version="1",
        summary="Encode, decode, sample, interpolate and score anomalies with a trained VAE.",
        lifespan=_lifespan(runtime),
        redoc_url=None,
    )
    app.state.service = state
    install_handlers(app)
    routers = [inference.router, anomaly.router, edit.router, edit.models, ops.probes, ops.router,
               oip.server, oip.probes, oip.models, oip.inference]
    included = routers + ([ui.router] if settings.ui else [])
    for router in included:
        app.include_router(router)
    openapi.install(app)  # the served document states the limits of these settings and the loaded model
    # What each path is (model work, a probe, the page: service.api.routing): the routes of our routers, and the
    # app's own (the OpenAPI document, the Swagger UI).
    routes = RouteTable([*app.routes, *(route for router in included for route in router.routes)])
    # Inside CORS: preflights pass. The page's own files are open: it asks for the key and sends it itself.
    app.add_middleware(ApiKeyRequired, settings=settings, metrics=state.metrics, routes=routes)
    app.add_middleware(ModelHeader)
    if settings.cors_origins:  # a page elsewhere may read which model answered
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=["X-Model-Sha256"])
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, metrics=state.metrics)
    app.add_middleware(InFlightLimit, limit=settings.max_in_flight, metrics=state.metrics, routes=routes)
    app.add_middleware(RequestMetrics, metrics=state.metrics, routes=routes)  # outermost: also counts 413s
    return app


def _lifespan(preloaded: Optional[ModelRuntime]) -> Callable[[FastAPI], AsyncIterator[None]]:
    # Held here only until the lifespan starts: after a reload nothing may keep the first model alive.
    handed = [preloaded] if preloaded is not None else []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state: ServiceState = app.state.service
        settings = state.settings
        runtime = handed.pop() if handed else await asyncio.to_thread(
            ModelRuntime, settings.model_path, device=settings.device, buckets=settings.buckets,
            max_score_decodes=settings.max_score_decodes, expected_sha256=settings.expected_sha256,
        )
        state.model = ServedModel.of(runtime, max_pixels=settings.max_pixels)
        state.metrics.serving(runtime.info, str(runtime.device))
        processes = settings.processes or 1  # this process's share of the machine (service.supervisor)
        workers = settings.model_workers or default_workers(runtime.device, processes)
        torch.set_num_threads(settings.torch_threads or default_torch_threads(runtime.device, workers, processes))
        # No default model: every submission names the model that answers its request (a reload swaps it).
        state.batcher = Batcher(None, kernels=KERNELS, max_delay_s=settings.batch_delay_ms / 1000.0,
                                queue_limit=settings.queue_limit, metrics=state.metrics, workers=workers)
        log.info("%d model worker(s), %d torch thread(s) each", workers, torch.get_num_threads())
        del runtime  # state.model holds it, and lets go of it when a reload replaces it
        state.batcher.start()
        # Warm in the background: /livez answers at once, /readyz turns 200 when every bucket is warm.
        warm_task = asyncio.create_task(_warm_up(state))
        hangup = _on_hangup(state)
        try:
            yield
        finally:
            state.draining = True
            state.metrics.set_ready(False)
            warm_task.cancel()
            if hangup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            await state.batcher.stop()

    return lifespan


def _on_hangup(state: ServiceState) -> bool:
    """SIGHUP reloads the model (service.api.reload.on_hangup); False where signals cannot be handled here (a
    test's app outside the main thread, or no SIGHUP on this platform)."""
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reload.on_hangup(state)))
    except (ValueError, RuntimeError, AttributeError, NotImplementedError):
        return False
    return True


async def _warm_up(state: ServiceState) -> None:
    runtime = state.model.runtime
    try:
        seconds = await state.batcher.run_in_worker(runtime.warm_up)
        await state.batcher.run_in_worker(release_free_memory)  # what the warm-up's largest calls left
    except Exception as exc:
        # Not ready, and not live either: an orchestrator should replace this process, not wait for it.
        log.exception("warm-up failed; the service stays not ready")
        state.failed = f"warm-up failed: {type(exc).__name__}"
        return
    state.warm = True
    state.metrics.set_ready(True)
    log.info("model warm on %s in %.2f s (buckets %s); ready", runtime.device, seconds, runtime.buckets)
