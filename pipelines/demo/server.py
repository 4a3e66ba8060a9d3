"""A loopback HTTP server for the demo world, and the test fixture for fetching.

It serves ``{root}/img/<name>`` plus a handful of misbehaving endpoints so the fetch stage can
be exercised against real sockets (img2dataset tests its downloader the same way):

===================================  ============================================================
``/img/<name>``                      the file ``{root}/img/<name>`` (content type by extension)
``/status/<code>``                   that status with a small text body
``/slow/<seconds>/img/<name>``       sleeps, then serves (other requests are not blocked)
``/noai/img/<name>``                 the file with ``X-Robots-Tag: noai``
``/redirect/img/<name>``             302 to ``/img/<name>``
``/flaky/<n>/img/<name>``            503 for the first n requests of that exact path, then the
                                     file
``/ratelimit/img/<name>``            429 + ``Retry-After: 0`` on the first request, then the file
``/empty``                           200 with a zero-byte body
``/html``                            200 with an HTML page labelled ``Content-Type: image/jpeg``
``/redirect-to?url=<absolute url>``  302 to that URL, whatever it is (redirect-to-private tests)
``/redirects/<n>/img/<name>``        a chain of n 302 redirects, then the file
``/drip-headers/<seconds>``          a status line and headers sent one byte every <seconds>,
                                     never finished (for at most 60 s, or until the client hangs
                                     up)
``/drip-body/<seconds>/img/<name>``  full headers of the file, then its body one byte every
                                     <seconds> (for at most 60 s, or until the client hangs up)
``/gzip/img/<name>``                 the file with ``Content-Encoding: gzip``
``/gzip-bomb/<megabytes>``           200 ``Content-Encoding: gzip``: that many MB of zeros,
                                     compressed (about 1000:1)
===================================  ============================================================

Counters (``requests``) are per server instance and per exact path (query string excluded);
``client_gone`` counts, per path, responses cut short because the client hung up.
"""

from __future__ import annotations

import collections
import errno
import functools
import gzip
import io
import logging
import mimetypes
import socket
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

log = logging.getLogger(__name__)

_HTML_PAGE = (
    b"<!doctype html><html><head><title>Not an image</title></head>"
    b"<body><p>This page is served as image/jpeg but it is HTML.</p></body></html>\n"
)
# A slow request never sleeps longer than this, whatever the URL asks for.
_MAX_SLOW_SECONDS = 300.0
# A drip route stops dripping after this long (the client should have given up long before).
_MAX_DRIP_SECONDS = 60.0
_MAX_BOMB_MEGABYTES = 1024


@functools.lru_cache(maxsize=4)
def _gzip_bomb(megabytes: int) -> bytes:
    """``megabytes`` MB of zeros, gzip-compressed (about 1 KB per MB)."""
    out = io.BytesIO()
    zeros = bytes(1 << 20)
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9, mtime=0) as f:
        for _ in range(megabytes):
            f.write(zeros)
    return out.getvalue()


class PortInUseError(OSError):
    """The requested port is already bound by another process."""


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 keeps connections alive, so a pooled client reuses them like it would on the web.
    protocol_version = "HTTP/1.1"
    server_version = "rs-corpus-demo/0.1"
    # Idle keep-alive connections are dropped after this many seconds.
    timeout = 15
    server: _Server

    # --- plumbing -------------------------------------------------------------------------
    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, add=False)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("demo server %s: " + format, self.address_string(), *args)

    def _send(
        self,
        status: int,
        body: bytes = b"",
        content_type: str = "text/plain; charset=utf-8",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        no_body = status < 200 or status in (204, 304)
        if not no_body:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", "0" if no_body else str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if body and not no_body and self.command != "HEAD":
            self.wfile.write(body)

    def _send_file(self, name: str, headers: dict[str, str] | None = None) -> None:
        path = self.server.resolve_image(name)
        if path is None:
            self._send(404, b"not found\n")
            return
        data = path.read_bytes()
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        self._send(200, data, ctype, headers)

    def _drip(self, data: bytes, interval: float) -> None:
        """Send ``data`` one byte every ``interval`` seconds, for at most _MAX_DRIP_SECONDS;
        then (or when the server stops) drop the connection. A client hanging up ends it with
        BrokenPipeError/ConnectionResetError (counted in ``client_gone``)."""
        self.close_connection = True
        self.wfile.flush()
        stop_at = time.monotonic() + _MAX_DRIP_SECONDS
        for i in range(len(data)):
            if self.server.stopping.wait(interval) or time.monotonic() > stop_at:
                return
            self.connection.sendall(data[i:i + 1])

    # --- routing --------------------------------------------------------------------------
    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        count = self.server.count(path)
        self.server.remember_headers(path, dict(self.headers.items()))
        parts = path.split("/")[1:]  # "/a/b" -> ["a", "b"]
        state = self.server.state
        with state.lock:
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            self._route(path, parts, count)
        except (BrokenPipeError, ConnectionResetError):
            log.debug("demo server: client went away during %s", path)
            self.close_connection = True
            with state.lock:
                state.client_gone[path] += 1
        finally:
            with state.lock:
                state.in_flight -= 1

    def _route(self, path: str, parts: list[str], count: int) -> None:
        head = parts[0] if parts else ""
        if head == "img" and len(parts) >= 2:
            self._send_file("/".join(parts[1:]))
        elif head == "status" and len(parts) == 2:
            try:
                code = int(parts[1])
            except ValueError:
                code = 0
            if not 200 <= code <= 599:
                self._send(400, b"status must be an integer in 200..599\n")
                return
            self._send(code, f"status {code}\n".encode())
        elif head == "slow" and len(parts) >= 4 and parts[2] == "img":
            try:
                seconds = min(max(float(parts[1]), 0.0), _MAX_SLOW_SECONDS)
            except ValueError:
                self._send(400, b"bad delay\n")
                return
            # Wait on the server's stop event, not time.sleep: shutting down wakes every sleeper.
            if self.server.stopping.wait(seconds):
                self.close_connection = True
                self._send(503, b"server shutting down\n", headers={"Connection": "close"})
                return
            self._send_file("/".join(parts[3:]))
        elif head == "noai" and len(parts) >= 3 and parts[1] == "img":
            self._send_file("/".join(parts[2:]), headers={"X-Robots-Tag": "noai"})
        elif head == "redirect" and len(parts) >= 3 and parts[1] == "img":
            target = "/img/" + "/".join(parts[2:])
            self._send(302, f"see {target}\n".encode(), headers={"Location": target})
        elif head == "flaky" and len(parts) >= 4 and parts[2] == "img":
            try:
                failures = int(parts[1])
            except ValueError:
                self._send(400, b"bad count\n")
                return
            if count <= failures:
                self._send(503, f"flaky: attempt {count} of {failures} failing\n".encode())
            else:
                self._send_file("/".join(parts[3:]))
        elif head == "ratelimit" and len(parts) >= 3 and parts[1] == "img":
            if count == 1:
                self._send(429, b"slow down\n", headers={"Retry-After": "0"})
            else:
                self._send_file("/".join(parts[2:]))
        elif head == "redirects" and len(parts) >= 4 and parts[2] == "img":
            try:
                hops = int(parts[1])
            except ValueError:
                self._send(400, b"bad count\n")
                return
            rest = "/".join(parts[3:])
            target = f"/redirects/{hops - 1}/img/{rest}" if hops > 1 else f"/img/{rest}"
            self._send(302, f"see {target}\n".encode(), headers={"Location": target})
        elif path == "/redirect-to":
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            target = (query.get("url") or [""])[0]
            if not target:
                self._send(400, b"redirect-to needs ?url=<absolute url>\n")
                return
            self._send(302, b"see other\n", headers={"Location": target})
        elif head in ("drip-headers", "drip-body") and len(parts) >= 2:
            try:
                interval = min(max(float(parts[1]), 0.01), _MAX_DRIP_SECONDS)
            except ValueError:
                self._send(400, b"bad interval\n")
                return
            if head == "drip-headers" and len(parts) == 2:
                self._drip(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nX-Drip: "
                           + b"a" * 65536, interval)
            elif head == "drip-body" and len(parts) >= 4 and parts[2] == "img":
                file = self.server.resolve_image("/".join(parts[3:]))
                if file is None:
                    self._send(404, b"not found\n")
                    return
                data = file.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", mimetypes.guess_type(file.name)[0] or "")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.flush()
                self._drip(data, interval)
            else:
                self._send(404, b"no such route\n")
        elif head == "gzip" and len(parts) >= 3 and parts[1] == "img":
            file = self.server.resolve_image("/".join(parts[2:]))
            if file is None:
                self._send(404, b"not found\n")
                return
            self._send(200, gzip.compress(file.read_bytes(), mtime=0),
                       mimetypes.guess_type(file.name)[0] or "application/octet-stream",
                       headers={"Content-Encoding": "gzip"})
        elif head == "gzip-bomb" and len(parts) == 2 and parts[1].isdigit():
            megabytes = min(int(parts[1]), _MAX_BOMB_MEGABYTES)
            self._send(200, _gzip_bomb(megabytes), "image/png",
                       headers={"Content-Encoding": "gzip"})
        elif path == "/empty":
            self._send(200, b"", "image/jpeg")
        elif path == "/html":
            self._send(200, _HTML_PAGE, "image/jpeg")
        else:
            self._send(404, b"no such route\n")


class _State:
    """Per-instance request counters and headers, shared by the handler threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()
        self.headers: dict[str, dict[str, str]] = {}
        self.in_flight = 0
        self.max_in_flight = 0  # the most requests served at once: shows a client's concurrency
        self.client_gone: collections.Counter[str] = collections.Counter()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default listen backlog is 5: a fetcher opening dozens of connections at
    # once would see SYNs dropped and stall a second on retransmission.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], img_root: Path, state: _State) -> None:
        self.img_root = img_root.resolve()
        self.stopping = threading.Event()
        self.state = state
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        super().__init__(address, _Handler)

    def count(self, path: str) -> int:
        with self.state.lock:
            self.state.counts[path] += 1
            return self.state.counts[path]

    def remember_headers(self, path: str, headers: dict[str, str]) -> None:
        with self.state.lock:
            self.state.headers[path] = headers

    def track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            (self._conns.add if add else self._conns.discard)(conn)

    def drop_connections(self) -> None:
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def resolve_image(self, name: str) -> Path | None:
        """``{root}/img/<name>`` if it is a file inside ``{root}/img``, else None."""
        name = urllib.parse.unquote(name)
        if not name or "\x00" in name:
            return None
        path = (self.img_root / name).resolve()
        if not path.is_relative_to(self.img_root) or not path.is_file():
            return None
        return path

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The default prints a traceback to stderr; clients hanging up is routine here.
        log.debug("demo server: error serving %s", client_address, exc_info=sys.exc_info())


class DemoServer:
    """Serve the demo world on ``host:port`` (``port=0``: an ephemeral port) in a daemon thread.

    >>> with DemoServer("data/demo") as srv:            # doctest: +SKIP
    ...     fetch_url(srv.url("/img/scene-0001.jpg"), FetchConfig())
    """

    def __init__(self, root: str | Path, host: str = "127.0.0.1", port: int = 0) -> None:
        self.root = Path(root)
        self.host = host
        self.port = port
        self._server: _Server | None = None
        self._state = _State()
        self._thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> Self:
        if self._server is not None:
            return self
        try:
            server = _Server((self.host, self.port), self.root / "img", self._state)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise PortInUseError(
                    e.errno,
                    f"DemoServer cannot listen on {self.host}:{self.port}: the port is already in "
                    "use (another demo server still running?). Stop it or pick another port "
                    "(port=0 picks a free one).",
                ) from e
            raise
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"DemoServer:{self.port}",
            daemon=True,
        )
        self._thread.start()
        log.debug("demo server listening on %s (root %s)", self.base_url, self.root)
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.stopping.set()  # wakes /slow/ sleepers
        server.shutdown()  # stops serve_forever
        server.drop_connections()  # unblocks handlers waiting on idle keep-alive sockets
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- introspection --------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def url(self, path: str) -> str:
        """Absolute URL of ``path`` (``"/img/a.jpg"``) on this server."""
        return self.base_url + (path if path.startswith("/") else "/" + path)

    @property
    def requests(self) -> collections.Counter[str]:
        """Requests received per exact path (a snapshot; missing paths count 0)."""
        with self._state.lock:
            return collections.Counter(self._state.counts)

    @property
    def max_in_flight(self) -> int:
        """The most requests this server has served at the same time."""
        with self._state.lock:
            return self._state.max_in_flight

    @property
    def client_gone(self) -> collections.Counter[str]:
        """Responses cut short because the client hung up, per exact path (a snapshot)."""
        with self._state.lock:
            return collections.Counter(self._state.client_gone)

    @property
    def last_headers(self) -> dict[str, dict[str, str]]:
        """The request headers of the latest request per path (a snapshot)."""
        with self._state.lock:
            return dict(self._state.headers)
