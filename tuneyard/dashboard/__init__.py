"""The web dashboard: static assets (plain ES modules, CSS, a vendored uPlot) served at ``/dashboard/``.

The page holds no secrets and calls only the public OpenAI-dialect HTTP API with the caller's own key, so it is
served without authentication; every answer carries a strict Content-Security-Policy (no inline script or style,
nothing from another origin).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, RedirectResponse, Response

PREFIX = "/dashboard"
STATIC = Path(__file__).parent / "static"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
       "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}
MEDIA = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}


def _assets() -> dict[str, Path]:
    """Every servable file by its URL path: a fixed table built at start, so no request path reaches the disk."""
    return {p.relative_to(STATIC).as_posix(): p for p in STATIC.rglob("*")
            if p.is_file() and p.suffix in MEDIA}


def _file(path: Path) -> FileResponse:
    return FileResponse(path, media_type=MEDIA[path.suffix], headers=HEADERS)


def build_router() -> APIRouter:
    """The dashboard's routes: the page at ``/dashboard/`` and its assets under ``/dashboard/static/``."""
    router = APIRouter(include_in_schema=False)
    assets = _assets()

    @router.get(PREFIX)
    def dashboard_root() -> RedirectResponse:
        return RedirectResponse(f"{PREFIX}/", headers=HEADERS)

    @router.get(f"{PREFIX}/")
    def dashboard_page() -> FileResponse:
        return _file(assets["index.html"])

    @router.get(PREFIX + "/static/{name:path}")
    def dashboard_asset(name: str) -> Response:
        path = assets.get(name)
        if path is None:
            return Response("not found", status_code=404, media_type="text/plain", headers=HEADERS)
        return _file(path)

    return router


def mount(app: FastAPI) -> None:
    """Serve the dashboard from ``app``."""
    app.include_router(build_router())
