"""Files served over HTTP on 127.0.0.1 for a test, like a distribution's mirror."""

from __future__ import annotations

import contextlib
import http.server
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.cloud_image import build_cloud_image, missing_tools
from vmlease._paths import image_dir

#: Paths under this are answered with a quarter of the body their Content-Length promises.
SHORT = "/short/"


@dataclass
class Served:
    """Files served on 127.0.0.1, and the paths asked for."""

    url: str
    root: Path
    requests: list[str] = field(default_factory=list)


def cloud_source() -> Path:
    """The cloud-style test image (Debian, cloud-init, no agent, no keys), built once;
    the test is skipped where it cannot be built."""
    need = missing_tools()
    if need:
        pytest.skip(f"building the test cloud image needs: apt-get install {' '.join(need)}")
    if os.geteuid() != 0:
        pytest.skip("building the test cloud image runs mmdebstrap as root")
    return build_cloud_image(image_dir().parent / "test-data")


@contextlib.contextmanager
def serve(root: Path) -> Iterator[Served]:
    """``root`` over HTTP until the block ends; ``SHORT`` + a path answers that file
    cut short (a download that breaks off)."""
    served = Served("", root)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

        def do_GET(self) -> None:
            served.requests.append(self.path)
            if self.path.startswith(SHORT):
                body = (root / self.path.removeprefix(SHORT)).read_bytes()[:65536]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body) * 4))
                self.end_headers()
                self.wfile.write(body)
                return
            super().do_GET()

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    served.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield served
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)
