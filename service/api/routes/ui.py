"""The page at ``/``: a look at the model in a browser (model card, reconstructions and anomaly scores of uploaded
images, samples, interpolations, edits), served by the service itself.

Three static files shipped in the package (``service/api/ui/``, package data): no CDN, no build step. They are
the only paths besides the probes that need no API key (their routes are ``PageRoute``s): the page holds
nothing secret and asks for the key itself, then sends it as ``X-API-Key`` on every fetch of our endpoints.
``VAE_UI=false`` leaves this router out, and the paths closed.
"""

from functools import lru_cache
from importlib import resources

from fastapi import APIRouter
from starlette.responses import Response

from service.api.routing import PageRoute

ASSETS = {  # path -> (file in service/api/ui/, media type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/ui/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/ui/style.css": ("style.css", "text/css; charset=utf-8"),
}

# The page loads only its own script and stylesheet, shows images from data: and blob: URLs (the service's
# base64 PNGs, the user's own files before upload), and talks only to this origin. No inline script or style is
# allowed, so text from a response can never run as code, and no other site may frame the page.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate: a new version of the service serves its own page at once
}

router = APIRouter(include_in_schema=False, route_class=PageRoute)  # not part of the API: the page is for people, not clients


@lru_cache(maxsize=None)
def _read(name: str) -> bytes:
    # Read on first request, not at import: the files come from the installed package (a wheel or the tree).
    return resources.files("service.api").joinpath("ui", name).read_bytes()


def _serve(path: str) -> Response:
    name, media_type = ASSETS[path]
    return Response(_read(name), media_type=media_type, headers=SECURITY_HEADERS)


@router.get("/", response_class=Response)
async def page() -> Response:
    """The page: model card, uploads with reconstructions and scores, samples, interpolations, edits."""
    return _serve("/")


@router.get("/ui/app.js", response_class=Response)
async def script() -> Response:
    """The page's script: plain JavaScript, no build step."""
    return _serve("/ui/app.js")


@router.get("/ui/style.css", response_class=Response)
async def stylesheet() -> Response:
    """The page's stylesheet."""
    return _serve("/ui/style.css")
