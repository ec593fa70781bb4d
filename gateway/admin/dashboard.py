"""The dashboard's static files: `/` and `/static/NAME`, served from `gateway/admin/static/`.

No token is needed for them (they hold no data: the page asks for the token, keeps it in the tab's
sessionStorage and sends it as a bearer header on every API call, so there is no cookie to forge a
request with). The files are listed once at start, so a request can name only a file that shipped;
every asset comes from here, none from a CDN, so the page works without internet. The Content Security
Policy allows nothing else either: no inline script, no other origin.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

from aiohttp import web

STATIC = Path(__file__).parent / "static"
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate, so a new release's page never runs with old scripts
}
TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".svg": "image/svg+xml"}


def _files() -> dict[str, tuple[bytes, str]]:
    found = {}
    for path in sorted(STATIC.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            kind = TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            found[path.name] = (path.read_bytes(), kind)
    return found


def add_dashboard_routes(app: web.Application) -> None:
    files = _files()

    def serve(name: str) -> web.Response:
        if name not in files:
            raise web.HTTPNotFound()
        body, kind = files[name]
        charset = "utf-8" if kind.startswith("text/") else None
        return web.Response(body=body, content_type=kind, charset=charset, headers=HEADERS)

    async def index(request: web.Request) -> web.Response:
        return serve("index.html")

    async def static(request: web.Request) -> web.Response:
        return serve(request.match_info["name"])

    app.router.add_get("/", index, allow_head=False)
    app.router.add_get("/index.html", index, allow_head=False)
    app.router.add_get("/static/{name}", static, allow_head=False)
