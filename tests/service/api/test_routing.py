"""Routes say what they are: a route added to a router of model routes is under the in-flight limit and counted
under its own label with role=model, with no list of paths to update; other routes are neither limited nor
mislabelled, and a path no route serves is counted as "other"."""

import asyncio

import httpx
from prometheus_client.parser import text_string_to_metric_families

from service.api.routes import inference, ops
from service.app import create_app
from service.config import Settings
from tests.helpers import REPO


def requests_total(text: str, **labels) -> float:
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "vae_requests_total" and all(s.labels.get(k) == v for k, v in labels.items()))


async def test_a_new_model_route_is_limited_and_labelled():
    entered, release = asyncio.Event(), asyncio.Event()

    async def held() -> dict:
        entered.set()
        await release.wait()
        return {"ok": True}

    async def status() -> dict:
        return {"ok": True}

    inference.router.add_api_route("/held", held, methods=["POST"])  # a model router: its routes are ModelRoutes
    ops.router.add_api_route("/status", status, methods=["GET"])  # a plain one
    try:
        # No lifespan, no model: the middleware and the route table need neither.
        app = create_app(Settings(model_path=REPO / "no-model.ts", max_in_flight=1))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://vae") as client:
            first = asyncio.ensure_future(client.post("/held"))
            await asyncio.wait_for(entered.wait(), 10)  # the first request holds the one in-flight place
            second = await client.post("/held")
            assert second.status_code == 503 and second.json()["error"]["code"] == "overloaded"
            assert (await client.get("/status")).status_code == 200  # not a model route: not limited
            release.set()
            assert (await first).status_code == 200
            await client.get("/no-such-path")
            text = (await client.get("/metrics")).text
    finally:
        inference.router.routes[:] = [r for r in inference.router.routes if r.path != "/held"]
        ops.router.routes[:] = [r for r in ops.router.routes if r.path != "/status"]
    assert requests_total(text, endpoint="/held", role="model", status="200") == 1
    assert requests_total(text, endpoint="/held", role="model", status="503") == 1
    assert requests_total(text, endpoint="/status", role="other", status="200") == 1
    assert requests_total(text, endpoint="other", role="other", status="404") == 1
