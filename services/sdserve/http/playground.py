"""The web playground's files: `GET /` is its page and `GET /playground/NAME` its assets, all
shipped in the package (`sdserve/http/playground/`), so the page needs no network and no build
step. The page calls only the public HTTP API (docs/playground.md)."""

from __future__ import annotations

import re
from importlib import resources

from starlette.responses import Response

from sdserve.errors import NotFound

ASSET = re.compile(r"^/playground/([A-Za-z0-9_-]{1,64}\.(html|js|css|png|svg))$")
"""Asset names: one level, no dots but the extension's (no way out of the folder)."""

MEDIA_TYPES = {
    "html": "text/html; charset=utf-8",
    "js": "text/javascript; charset=utf-8",
    "css": "text/css; charset=utf-8",
    "png": "image/png",
    "svg": "image/svg+xml",
}


def is_playground(route: str) -> bool:
    return route in ("/", "/playground", "/playground/") or ASSET.match(route) is not None


def playground_file(route: str) -> Response:
    """The page (`/`) or one of its assets. Raises NotFound."""
    match = ASSET.match(route)
    name = match[1] if match else "index.html"
    file = resources.files("sdserve.http") / "playground" / name
    if not file.is_file():
        raise NotFound(f"no playground file {name!r}")
    media_type = MEDIA_TYPES[name.rpartition(".")[2]]
    # no-cache: a browser revalidates, so a new version of sdserve serves its new page at once
    return Response(file.read_bytes(), media_type=media_type, headers={"cache-control": "no-cache"})
