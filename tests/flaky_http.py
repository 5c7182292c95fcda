"""A scripted, deterministic faulty HTTP server on 127.0.0.1 for the retry tests.

`FlakyServer(files, script)` serves `files` (path -> bytes). `script[path]` is a list of faults for
the first requests of that path, one per request, after which the path is served normally; a
fault given as `("always", fault)` applies to every request. Faults:

    "503", "429", "500", "404"   that status, empty body (429 and 503 with Retry-After: 0)
    "drop"                       200 and the full Content-Length, half the body, then the connection closes
    "reset"                      the connection closes before any response
    ("stall", seconds)           no response for that long (ended early when the server stops), then 200

`requests[path]` counts the requests of each path.
"""

from __future__ import annotations

import http.server
import socket
import threading
from collections import Counter


class _Handler(http.server.BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers: a dropped connection is a real event

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(head=False)

    def _answer(self, head: bool) -> None:
        path = self.path.split("?", 1)[0]
        fault = self.server.owner.next_fault(path)
        body = self.server.owner.files.get(path)
        if isinstance(fault, tuple) and fault[0] == "stall":
            self.server.owner.stopping.wait(fault[1])
            fault = None
        if fault == "reset":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault in ("503", "429", "500", "404") or body is None:
            status = int(fault) if fault else 404
            self.send_response(status)
            if status in (429, 503):
                self.send_header("Retry-After", "0")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if head:
            return
        if fault == "drop":
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    owner: "FlakyServer"

    def handle_error(self, request, client_address) -> None:
        pass  # a client that gave up (a timeout) breaks the pipe of a stalled answer: expected here


class FlakyServer:
    """Use as a context manager; `url(path)` is the address of a path."""

    def __init__(self, files: dict[str, bytes], script: dict[str, list] | None = None):
        self.files = dict(files)
        self.script = {path: list(faults) for path, faults in (script or {}).items()}
        self.requests: Counter = Counter()
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def next_fault(self, path: str):
        with self._lock:
            self.requests[path] += 1
            faults = self.script.get(path)
            if not faults:
                return None
            if isinstance(faults[0], tuple) and faults[0][0] == "always":
                return faults[0][1]
            return faults.pop(0)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._server.server_port}{path}"

    def __enter__(self) -> "FlakyServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
