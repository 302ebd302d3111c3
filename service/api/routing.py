"""What each route is, said by the route itself, and the table the middleware asks.

A route's class states its role: ``ModelRoute`` for an endpoint that queues model work (the in-flight limit,
the latency alert), ``ProbeRoute`` for liveness and readiness (never behind the API key), ``PageRoute`` for the
page at ``/`` and its files (open with a key set: the page asks for the key itself); any other route is
``Role.OTHER``. A router takes its routes' class (``APIRouter(route_class=ModelRoute)``), so a new endpoint is
limited, keyed and labelled by what it declares, never by a list of paths kept elsewhere.

``create_app`` builds one ``RouteTable`` from the app's routes; the middleware asks it for every request, before
routing, for the request's role and its metrics label: the route's path template (bounded: a client's
arbitrary paths never become label values; one that matches no route is ``other``).
"""

from dataclasses import dataclass
from enum import Enum
from typing import Dict, List, Mapping, Sequence

from fastapi.routing import APIRoute
from starlette.routing import BaseRoute, Match


class Role(str, Enum):
    MODEL = "model"
    PROBE = "probe"
    PAGE = "page"
    OTHER = "other"


class RoleRoute(APIRoute):
    role = Role.OTHER

    def label(self, params: Mapping[str, str]) -> str:
        """The metrics label of a request this route matched with these path parameters."""
        return self.path_format


class ModelRoute(RoleRoute):
    role = Role.MODEL


class ProbeRoute(RoleRoute):
    role = Role.PROBE


class PageRoute(RoleRoute):
    role = Role.PAGE


@dataclass(frozen=True)
class Entry:
    role: Role
    label: str


UNMATCHED = Entry(Role.OTHER, "other")


class RouteTable:
    """Path -> the role and metrics label of the route that serves it, whatever the method (a GET to a POST
    route is still that route's request, answered 405)."""

    def __init__(self, routes: Sequence[BaseRoute]) -> None:
        self.static: Dict[str, Entry] = {}
        self.templated: List[BaseRoute] = []
        for route in routes:
            path = getattr(route, "path_format", None)
            if path is None:
                continue
            if "{" in path:
                self.templated.append(route)
            else:
                self.static.setdefault(path, _entry(route, {}))

    def find(self, path: str) -> Entry:
        entry = self.static.get(path)
        if entry is not None:
            return entry
        scope = {"type": "http", "path": path, "method": "GET", "root_path": ""}
        for route in self.templated:
            match, child = route.matches(scope)
            if match is not Match.NONE:
                return _entry(route, child.get("path_params", {}))
        return UNMATCHED


def _entry(route: BaseRoute, params: Mapping[str, str]) -> Entry:
    if isinstance(route, RoleRoute):
        return Entry(route.role, route.label(params))
    return Entry(Role.OTHER, route.path_format)  # FastAPI's own: the OpenAPI document, the Swagger UI
