"""/openapi.json as the running server sees it: FastAPI's document, built from the routes, plus the limits that
only the settings and the loaded model know (the latent size, rows per request, n, steps, K, the score kinds,
strengths per edit).

With them in the schemas, requests generated from the document (by a client library or a fuzzer) are the ones
the server accepts, and one that violates the document is one the server refuses.
"""

import copy
from typing import Dict, Iterable, List

from fastapi import FastAPI

from service.config import Settings
from service.api.schemas import MAX_STRENGTHS


def install(app: FastAPI) -> None:
    """Make ``app.openapi()``, which /openapi.json and /docs serve, return ``constrain``'s document once the
    lifespan has loaded the model; before that (``create_app().openapi()`` in a test) FastAPI's own."""
    generic = app.openapi  # FastAPI's: builds the document from the routes once, then caches it
    constrained: Dict[str, dict] = {}  # per served model: a reload may change the latent size and the kinds

    def openapi() -> dict:
        model = app.state.service.model
        if model is None:
            return generic()
        if model.info.sha256 not in constrained:
            constrained.clear()
            constrained[model.info.sha256] = constrain(generic(), app.state.service.settings, model.info.latent_dim,
                                                       model.score_kinds.kinds)
        return constrained[model.info.sha256]

    app.openapi = openapi


def constrain(document: dict, settings: Settings, latent_dim: int, score_kinds: Iterable[str]) -> dict:
    """A copy of ``document`` with the server's limits in the schemas they apply to."""
    doc = copy.deepcopy(document)  # FastAPI's document shares dicts with the routes' openapi_extra
    post = {path: item["post"] for path, item in doc["paths"].items() if "post" in item}
    rows = {"maxItems": settings.max_rows}
    vector = {"minItems": latent_dim, "maxItems": latent_dim}

    z = _json(post["/decode"])["properties"]["z"]
    z.update(rows)
    z["items"].update(vector)
    _json(post["/sample"])["properties"]["n"]["maximum"] = settings.max_n
    _query(post["/interpolate"], "steps")["maximum"] = settings.max_steps
    _json(post["/interpolate"])["properties"]["z"]["anyOf"][0]["items"].update(vector)
    for path in ("/encode", "/anomaly-score"):
        _json(post[path])["properties"]["images"].update(rows)
        _files(post[path]).update(rows)
    _query(post["/anomaly-score"], "k")["anyOf"][0]["maximum"] = settings.max_k
    _query(post["/anomaly-score"], "score")["anyOf"][0]["enum"] = sorted(score_kinds)

    # /edit: rows and vectors as above, at most MAX_STRENGTHS strengths (more: 413), and inputs x strengths
    # decoded images within max_rows, which a schema cannot say (413 too).
    edit = _json(post["/edit"])["properties"]
    edit["images"]["anyOf"][0].update(rows)
    edit["z"]["anyOf"][0].update(rows)
    edit["z"]["anyOf"][0]["items"].update(vector)
    edit["vector"]["anyOf"][0].update(vector)
    edit["strengths"]["maxItems"] = MAX_STRENGTHS
    _files(post["/edit"]).update(rows)
    _query(post["/edit"], "strength")["anyOf"][0]["maxItems"] = MAX_STRENGTHS
    # /directions/compute: the two groups together at most max_rows, so each at most max_rows - 1.
    for media in ("application/json", "multipart/form-data"):
        for group in _schema(post["/directions/compute"], media)["properties"].values():
            group["maxItems"] = max(1, settings.max_rows - 1)
    return doc


def _schema(operation: dict, media: str) -> dict:
    return operation["requestBody"]["content"][media]["schema"]


def _json(operation: dict) -> dict:
    return _schema(operation, "application/json")


def _files(operation: dict) -> dict:
    return _schema(operation, "multipart/form-data")["properties"]["file"]


def _query(operation: dict, name: str) -> dict:
    return next(p["schema"] for p in operation["parameters"] if p["in"] == "query" and p["name"] == name)
