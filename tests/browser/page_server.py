"""Serves the test page and the shipped demo on 127.0.0.1, both with the one shipped client."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator
from urllib.parse import urlencode, urlsplit

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parents[1] / "examples" / "browser"
FILES = {  # URL path -> file; nothing else is served
    "/page.html": HERE / "page.html",
    "/page.js": HERE / "page.js",
    "/index.html": EXAMPLES / "index.html",
    "/demo.js": EXAMPLES / "demo.js",
    "/ksw1.js": EXAMPLES / "ksw1.js",
}
# module scripts load only with a JavaScript MIME type
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8"}


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        file = FILES.get(urlsplit(self.path).path)
        if file is None:
            self.send_error(404)
            return
        body = file.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", TYPES[file.suffix])
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # requests are not worth a line of test output


class Pages:
    """Where a running server is: its origin and the URLs of its pages."""

    def __init__(self, origin: str) -> None:
        self.origin = origin

    def url(self, path: str, **params: object) -> str:
        return f"{self.origin}{path}?{urlencode(params)}"


@contextmanager
def serve_pages() -> Iterator[Pages]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Pages(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
