"""Fetch: turn a record's ``url`` into bytes, or a ``Reject`` saying why not.

The pure part is :func:`fetch_url` (one URL) and :class:`Fetcher` (many URLs in flight from one
worker, like img2dataset's downloader threads). The Beam part is :class:`FetchDoFn` and
:class:`Fetch`.

**Streaming, not batches.** :class:`FetchDoFn` keeps up to ``threads x processes`` fetches in
flight and emits each record as soon as *its* fetch is done, whatever the others do; a new
fetch starts as each one ends. A slow or dead host therefore holds one thread for up to its
deadline, never the records fetched beside it (fetching in batches waited for the slowest
fetch of every batch: with 2% of URLs answering in 3 s, a 2000-image build took 5x longer
than img2dataset's; see ``make perf-ingest``'s straggler row). The rest of the bundle's
fetches finish in ``finish_bundle``; their records leave in the global window, where they
live.

**Worker processes.** ``FetchConfig.processes`` > 1 moves fetching (and decoding, with
``decode``) into that many forked processes per Beam worker (:class:`FetchProcesses`), each
with its own ``threads`` threads, pool and watchdog, so the per-request Python and Pillow's
Python parts leave the worker's GIL. Each URL goes to the process with the fewest in flight
(in small groups, one message each), and results come back as they end (each process sends
every result ready since its last message). For a local build's single
in-memory worker (the recipes' ``--fetch_processes auto``); a cluster's runner already runs a
worker per core.

Rows of LAION-style web parquet are untrusted input, so fetching is built like a careful crawler:

**Supported URLs.** ``http://`` and ``https://``, through ``urllib3`` used directly: one pooled
``PoolManager`` per :class:`Fetcher` (pool sized to ``threads``), redirects followed by our own
loop so that every hop is checked (at most ``max_redirects``; a redirect to anything but
http(s) is refused), byte cap enforced on ``Content-Length`` and while reading (on the *decoded*
bytes of a gzip/deflate ``Content-Encoding``, so compression bombs are capped), retries with
exponential backoff on 429/5xx/timeouts/connection resets, ``Retry-After`` honoured up to a cap,
``X-Robots-Tag: noai``-style opt-outs honoured like img2dataset. TLS is verified (certifi's
bundle when installed, else the system's).

**No stored credentials, no environment proxies.** Nothing reads ``~/.netrc``, ``NETRC``,
``HTTP(S)_PROXY``/``NO_PROXY`` or any other ambient configuration: no ``Authorization`` or
``Proxy-Authorization`` header is ever sent, on the first request or after a redirect (a crawler
must not hand a user's passwords to hosts named by its input), nor is a ``user:password@`` in
the URL turned into one; requests go straight to the host in the URL.

**One deadline per fetch** (``deadline``, seconds): it covers name resolution, connecting, every
redirect hop, headers and body of *all* attempts, and the back-off sleeps (no retry starts and no
``Retry-After`` wait begins if it would pass the deadline). It is enforced by the client, not by
checking between reads: a per-process watchdog thread shuts down the socket of a fetch whose
deadline passes, so a server dripping one header or body byte at a time cannot hold a thread
(nor ``fetch_many``, nor ``close()``) beyond it. ``timeout`` stays the per-connect/per-read
socket timeout.

**Address guard (SSRF).** On by default: every connection, the first and each one after a
redirect, resolves the host itself and refuses an address that is not globally routable
(loopback, RFC 1918 private, link-local incl. the 169.254.169.254 cloud-metadata endpoint, CGNAT
100.64/10, IPv6 ULA fc00::/7, unspecified, multicast, reserved; IPv4-mapped/6to4/NAT64 IPv6
addresses are judged by the IPv4 address inside), then connects to the very address it vetted
(the ``Host`` header and TLS SNI keep the host name), so DNS rebinding gains nothing. IP-literal
hosts are checked the same way. ``allow_networks`` lists CIDRs exempt from the guard (the demo
world's 127.0.0.0/8 server); ``address_guard=False`` switches it off.

**Local paths and bucket URLs** (plain paths, ``file://``, ``gs://``, ``s3://``, ...) are *not*
fetched by default: a web row naming ``/proc/self/environ`` or a bucket readable with the worker's
credentials is an ``unsupported_scheme`` reject. ``allowed_prefixes`` opts in: a local path or
``file://`` URL is read when its real path (symlinks and ``..`` resolved, and checked again on
the opened descriptor) lies under the real path of a listed directory; a bucket URL when, with
``.``/``..`` segments resolved, it starts with a listed ``scheme://bucket/prefix``. Only regular
files are read: local files are opened with ``O_NONBLOCK`` and ``fstat``-ed, so a FIFO, device,
socket or directory is refused without blocking. Local files are read with ``os`` calls rather
than Beam's ``FileSystems`` (which cannot open without blocking nor ``fstat``); bucket URLs go
through ``FileSystems``, with the byte cap and the deadline checked between 1 MiB reads.

Reject reasons (stage ``"fetch"``): ``missing_url``, ``invalid_url``, ``unsupported_scheme``
(any scheme but http(s), local paths and bucket URLs unless allowed, redirects to non-http(s)),
``path_not_allowed`` (local path or bucket URL outside ``allowed_prefixes``),
``not_a_regular_file``, ``address_refused`` (the guard; the detail names the address and why),
``connection_error`` (refused, reset, TLS failure, DNS lookup failure — the detail says which;
only resets and temporary DNS failures are retried), ``timeout`` (a socket timeout, or the
deadline: "deadline 30.0s passed while reading the body after 2 attempt(s)"),
``http_<code>``, ``too_many_redirects``, ``too_large``, ``empty_body``, ``robots_noai``,
``file_not_found``, ``read_error`` and, for anything unforeseen, ``fetch_error`` (the detail
carries the exception). Nothing here raises for a bad URL.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import email.utils
import functools
import heapq
import ipaddress
import itertools
import logging
import os
import queue
import re
import socket
import ssl
import stat
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from http.client import HTTPException
from typing import Any, Self

import apache_beam as beam
import urllib3
import urllib3.exceptions as u3e
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import BoundedWindow, GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.util import parse_url
from urllib3.util.connection import allowed_gai_family
from urllib3.util.ssl_ import create_urllib3_context

from pipelines.progress import Progress
from pipelines.records import MAIN, REJECTS, Reject, reject_row

log = logging.getLogger(__name__)

STAGE = "fetch"
DEFAULT_USER_AGENT = (
    "rs-corpus/0.1 (+https://github.com/rs-corpus/rs-corpus; img2dataset-compatible)"
)
# Statuses worth another attempt: the server may answer differently in a moment.
_RETRYABLE_STATUS = frozenset({408, 425, 429}) | frozenset(range(500, 600))
_REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
# X-Robots-Tag directives that take a value after a colon (so the colon is not a UA prefix).
_VALUED_DIRECTIVES = frozenset(
    {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}
)
_CHUNK = 256 * 1024  # HTTP body read size
_FILE_CHUNK = 1 << 20  # local/bucket read size (the deadline is checked between reads)
_DRAIN_LIMIT = 64 * 1024  # unwanted bodies (errors, redirects) up to this size keep the connection
_NOT_FETCHED = (
    "local paths and bucket URLs are not fetched from web rows; allow them with "
    "--allow_path_prefixes"
)


@dataclasses.dataclass(frozen=True)
class FetchConfig:
    """How to download. Defaults follow img2dataset where it has an equivalent flag.

    ``timeout``: seconds per connect and per socket read. ``deadline``: seconds for the whole
    fetch of one URL (all attempts, redirects and back-off sleeps; see the module docs).
    ``address_guard``/``allow_networks``: the SSRF guard and the CIDRs exempt from it (e.g.
    ``("127.0.0.0/8",)`` for a loopback test server). ``allowed_prefixes``: local directories
    and ``gs://``/``s3://`` prefixes that rows may name (none by default: web rows are fetched
    over http(s) only).
    """

    timeout: float = 10.0  # seconds per connect and per socket read
    retries: int = 2  # extra attempts on 429/5xx/timeouts/connection resets
    backoff: float = 0.5  # seconds; attempt k waits backoff * 2**(k-1) unless Retry-After says
    max_retry_after: float = 10.0  # cap on an honoured Retry-After, seconds
    deadline: float = 30.0  # whole-fetch wall clock: every attempt, hop, read and back-off
    max_redirects: int = 10  # hops per attempt; one more is too_many_redirects
    max_bytes: int = 20 * 2**20
    user_agent: str = DEFAULT_USER_AGENT
    respect_noai: bool = True
    noai_directives: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")
    # X-Robots-Tag lines addressed to one of these user-agent tokens apply to us (we are an
    # img2dataset-compatible crawler, so opt-outs aimed at img2dataset are honoured too).
    user_agent_tokens: tuple[str, ...] = ("rs-corpus", "img2dataset")
    threads: int = 64  # requests in flight per worker (per process, with processes > 1)
    # Worker processes that fetch (and decode) for each Beam worker: 1 fetches in the worker's
    # own threads; more moves the per-request Python and the decoding out of the worker's GIL
    # (for a local build's single in-memory worker; on a cluster, the runner's workers already
    # fill the cores).
    processes: int = 1
    address_guard: bool = True  # refuse non-global addresses (SSRF guard)
    allow_networks: tuple[str, ...] = ()  # CIDRs exempt from the address guard
    allowed_prefixes: tuple[str, ...] = ()  # local dirs / bucket prefixes rows may name

    def __post_init__(self) -> None:
        for name in ("noai_directives", "user_agent_tokens", "allow_networks",
                     "allowed_prefixes"):
            value = getattr(self, name)
            if isinstance(value, str):  # ("a") is a str: a one-element tuple was meant
                value = (value,) if value else ()
            object.__setattr__(self, name, tuple(value))
        if self.timeout <= 0 or self.deadline <= 0:
            raise ValueError("timeout and deadline must be positive")
        if self.retries < 0 or self.backoff < 0 or self.max_retry_after < 0:
            raise ValueError("retries, backoff and max_retry_after must be >= 0")
        if self.max_redirects < 0:
            raise ValueError("max_redirects must be >= 0")
        if self.max_bytes <= 0 or self.threads <= 0 or self.processes <= 0:
            raise ValueError("max_bytes, threads and processes must be positive")
        _networks(self.allow_networks)  # raises ValueError naming a bad CIDR
        if any(not str(p).strip() for p in self.allowed_prefixes):
            raise ValueError("allowed_prefixes must not contain empty strings")


def _reject(reason: str, detail: str | None = None) -> Reject:
    return Reject(stage=STAGE, reason=reason, detail=detail)


# --- the address guard ------------------------------------------------------------------------

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Instance-metadata endpoints of the big clouds (some are not even "private").
_METADATA = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200",
              "168.63.129.16")
)


class AddressRefused(Exception):
    """The address guard refused every address of a host (``args[0]``: why)."""


class DeadlinePassed(Exception):
    """The fetch's deadline passed (raised where it is noticed without a socket to shut)."""


@functools.lru_cache(maxsize=64)
def _networks(cidrs: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    out = []
    for cidr in cidrs:
        try:
            out.append(ipaddress.ip_network(str(cidr).strip(), strict=False))
        except ValueError as e:
            raise ValueError(f"allow_networks: {cidr!r} is not a network: {e}") from e
    return tuple(out)


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped ::ffff:a.b.c.d, 6to4, NAT64)."""
    if ip.version != 6:
        return None
    assert isinstance(ip, ipaddress.IPv6Address)
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _category(ip: IPAddress) -> str | None:
    """What makes ``ip`` unfit for a crawler to connect to ("private"), or None."""
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.version == 4 and ip in _CGNAT:
        return "shared address space (CGNAT 100.64.0.0/10)"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private:
        return "private"
    if getattr(ip, "is_site_local", False):
        return "site-local"
    if not ip.is_global:
        return "not globally routable"
    return None


def address_refusal(ip: IPAddress, allow: Sequence[Any] = ()) -> str | None:
    """Why the guard refuses to connect to ``ip`` ("10.0.0.5 is private"), or None.

    ``allow``: networks (``ipaddress`` objects) exempt from the guard. An IPv6 address that
    stands for an IPv4 one (mapped, 6to4, NAT64) is judged by the IPv4 address."""
    inner = _embedded_ipv4(ip)
    judged: IPAddress = inner if inner is not None else ip
    for net in allow:
        if judged.version == net.version and judged in net:
            return None
        if inner is not None and ip.version == net.version and ip in net:
            return None
    name = str(ip) if inner is None else f"{ip} (IPv4 {inner})"
    what = _category(judged)
    if judged in _METADATA:
        return f"{name} is {what or 'a cloud host endpoint'} (cloud metadata)"
    return None if what is None else f"{name} is {what}"


# --- the per-fetch clock and the watchdog that enforces it -------------------------------------


class _Clock:
    """One fetch's deadline, and the connection it is using (which the watchdog may shut)."""

    __slots__ = ("allow", "cfg", "conn", "deadline", "done", "expired", "phase")

    def __init__(self, cfg: FetchConfig) -> None:
        self.cfg = cfg
        self.deadline = time.monotonic() + cfg.deadline
        self.expired = False
        self.done = False
        self.conn: Any = None  # the connection this fetch owns now (see _claim)
        self.phase = "starting"
        self.allow = _networks(cfg.allow_networks)


_local = threading.local()
# Guards connection ownership (conn._rs_owner) and the watchdog's shutdown of an owned socket:
# a connection back in its pool is owned by nobody, so one fetch's deadline can never shut a
# socket that another fetch has picked up.
_OWN_LOCK = threading.Lock()


def _claim(conn: Any, sock: Any) -> None:
    """Make the current fetch (if any) the owner of ``conn``, whose live socket is ``sock``
    (None while it is not connected yet)."""
    clock = getattr(_local, "clock", None)
    if clock is None:
        return
    with _OWN_LOCK:
        conn._rs_owner = clock
        conn._rs_sock = sock
        clock.conn = conn
    if clock.expired:
        raise DeadlinePassed()


def _expire(clock: _Clock) -> None:
    with _OWN_LOCK:
        if clock.done:
            return
        clock.expired = True
        conn = clock.conn
        if conn is None or conn._rs_owner is not clock:
            return
        sock = conn._rs_sock
        if sock is None:
            return
        try:  # the plain socket method: also right for an SSLSocket, from another thread
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass


class _Watchdog:
    """One thread per process: expires each fetch's clock when its deadline passes."""

    def __init__(self) -> None:
        self._cv = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, _Clock]] = []
        self._seq = itertools.count()  # unique tie-breaker: clocks are never compared
        self._thread: threading.Thread | None = None

    def watch(self, clock: _Clock) -> None:
        with self._cv:
            heap = self._heap
            seq = next(self._seq)
            if seq % 4096 == 0 and len(heap) > 8192:  # finished fetches wait for their turn:
                self._heap = heap = [e for e in heap if not e[2].done]  # drop them now and then
                heapq.heapify(heap)
            heapq.heappush(heap, (clock.deadline, seq, clock))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fetch-deadlines",
                                                daemon=True)
                self._thread.start()
            elif heap[0][2] is clock:
                self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while True:
                    heap = self._heap
                    while heap and heap[0][2].done:
                        heapq.heappop(heap)
                    if not heap:
                        self._cv.wait()
                        continue
                    delay = heap[0][0] - time.monotonic()
                    if delay <= 0:
                        clock = heapq.heappop(heap)[2]
                        break
                    self._cv.wait(delay)
            _expire(clock)


_WATCHDOG = _Watchdog()
_RESOLVER: concurrent.futures.ThreadPoolExecutor | None = None
_RESOLVER_LOCK = threading.Lock()


def _resolver() -> concurrent.futures.ThreadPoolExecutor:
    """Name lookups run here so that a slow resolver cannot hold a fetch past its deadline."""
    global _RESOLVER
    if _RESOLVER is None:
        with _RESOLVER_LOCK:
            if _RESOLVER is None:
                _RESOLVER = concurrent.futures.ThreadPoolExecutor(
                    max_workers=256, thread_name_prefix="fetch-dns")
    return _RESOLVER


def _after_fork_in_child() -> None:
    global _WATCHDOG, _RESOLVER, _OWN_LOCK, _RESOLVER_LOCK
    _WATCHDOG = _Watchdog()
    _RESOLVER = None
    _OWN_LOCK = threading.Lock()
    _RESOLVER_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# --- urllib3 plumbing: guarded connections, pools, TLS ----------------------------------------


def _resolve(host: str, port: int, clock: _Clock | None) -> list[tuple[Any, ...]]:
    """``getaddrinfo``-style (family, type, proto, canonname, sockaddr) for ``host``."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None:  # an IP literal: no lookup
        if ip.version == 6:
            return [(socket.AF_INET6, socket.SOCK_STREAM, 0, "", (host, port, 0, 0))]
        return [(socket.AF_INET, socket.SOCK_STREAM, 0, "", (host, port))]
    lookup = socket.getaddrinfo
    if clock is None:
        return lookup(host, port, allowed_gai_family(), socket.SOCK_STREAM)
    clock.phase = "resolving the host name"
    remaining = clock.deadline - time.monotonic()
    if remaining <= 0:
        raise DeadlinePassed()
    future = _resolver().submit(lookup, host, port, allowed_gai_family(), socket.SOCK_STREAM)
    try:
        return future.result(timeout=remaining)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise DeadlinePassed() from None


class _GuardedMixin:
    """Connects only to vetted addresses and registers its socket with the current fetch."""

    _rs_owner: _Clock | None = None
    _rs_sock: Any = None
    _rs_next_phase = "reading headers"  # what a connection does once connected

    def _new_conn(self) -> socket.socket:
        conn: Any = self
        clock: _Clock | None = getattr(_local, "clock", None)
        host = conn._dns_host.strip("[]")
        port = conn.port
        try:
            infos = _resolve(host, port, clock)
        except socket.gaierror as e:
            raise u3e.NameResolutionError(conn.host, conn, e) from e
        guard = clock.cfg.address_guard if clock is not None else True
        allow = clock.allow if clock is not None else ()
        targets = []
        refused: list[str] = []
        for family, socktype, proto, _, sockaddr in infos:
            if guard:
                why = address_refusal(ipaddress.ip_address(sockaddr[0].split("%", 1)[0]), allow)
                if why is not None:
                    refused.append(why)
                    continue
            targets.append((family, socktype, proto, sockaddr))
        if not targets:
            if refused:  # "10.0.0.5 is private" / "evil.example: 127.0.0.1 is loopback"
                literal = infos[0][4][0] == host
                raise AddressRefused(refused[0] if literal else f"{host}: {refused[0]}")
            raise u3e.NameResolutionError(conn.host, conn, socket.gaierror("no addresses"))
        timeout = conn.timeout
        err: OSError | None = None
        for family, socktype, proto, sockaddr in targets:
            if clock is not None:
                remaining = clock.deadline - time.monotonic()
                if clock.expired or remaining <= 0:
                    raise DeadlinePassed()
                clock.phase = "connecting"
                # the watchdog cannot cut a connect() short: its timeout does
                if not isinstance(timeout, int | float) or timeout > remaining:
                    timeout = remaining
            sock = socket.socket(family, socktype, proto)
            try:
                for opt in conn.socket_options or ():
                    sock.setsockopt(*opt)
                if isinstance(timeout, int | float) or timeout is None:
                    sock.settimeout(timeout)
                if conn.source_address:
                    sock.bind(conn.source_address)
                sock.connect(sockaddr)
            except OSError as e:
                sock.close()
                err = e
                continue
            try:
                _claim(conn, sock)
            except DeadlinePassed:
                sock.close()
                raise
            if clock is not None:
                clock.phase = conn._rs_next_phase
            sys.audit("http.client.connect", conn, conn.host, port)
            return sock
        if isinstance(err, TimeoutError):
            raise u3e.ConnectTimeoutError(
                conn, f"Connection to {conn.host} timed out. (connect timeout={timeout})"
            ) from err
        raise u3e.NewConnectionError(conn, f"Failed to establish a new connection: {err}") from err

    def request(self, *args: Any, **kwargs: Any) -> None:
        conn: Any = self
        _claim(conn, conn.sock)  # a pooled keep-alive connection joins this fetch's clock
        clock = getattr(_local, "clock", None)
        if clock is not None:
            clock.phase = "reading headers"
        super().request(*args, **kwargs)  # type: ignore[misc]


class _HTTPConnection(_GuardedMixin, HTTPConnection):
    pass


class _HTTPSConnection(_GuardedMixin, HTTPSConnection):
    _rs_next_phase = "doing the TLS handshake"


class _PoolMixin:
    def _put_conn(self, conn: Any) -> None:
        if conn is not None and conn._rs_owner is not None:
            with _OWN_LOCK:  # back in the pool: no fetch's deadline may shut it any more
                conn._rs_owner = None
        super()._put_conn(conn)  # type: ignore[misc]


class _HTTPPool(_PoolMixin, HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(_PoolMixin, HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class _WatchedSSLSocket(ssl.SSLSocket):
    """An SSLSocket that, before its handshake, becomes the socket the watchdog shuts (the
    plain socket it wraps is detached by then)."""

    def do_handshake(self, block: bool = False) -> None:
        clock = getattr(_local, "clock", None)
        if clock is not None:
            with _OWN_LOCK:
                conn = clock.conn
                if conn is not None and conn._rs_owner is clock:
                    conn._rs_sock = self
        super().do_handshake(block)


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    context = create_urllib3_context()  # CERT_REQUIRED, hostname checked
    try:
        import certifi

        context.load_verify_locations(certifi.where())  # what requests used
    except ImportError:
        context.load_default_certs()
    context.sslsocket_class = _WatchedSSLSocket
    return context


def make_pool_manager(cfg: FetchConfig) -> urllib3.PoolManager:
    """A ``urllib3.PoolManager`` for ``cfg``: up to ``cfg.threads`` connections per host, no
    urllib3 retries or redirects (the fetch loop does both), guarded connections, and no
    ambient configuration at all (no ``~/.netrc``, no environment proxies)."""
    manager = urllib3.PoolManager(
        num_pools=max(16, cfg.threads),
        maxsize=cfg.threads,
        block=False,
        retries=False,
        ssl_context=_ssl_context(),
    )
    manager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
    return manager


# --- HTTP ---------------------------------------------------------------------------------


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps (``args``, urllib3's ``reason``, ``__cause__``/``__context__``)."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen or len(seen) > 32:
            continue
        seen.add(id(e))
        yield e
        nested = [getattr(e, "reason", None), e.__cause__, e.__context__, *e.args]
        todo.extend(x for x in nested if isinstance(x, BaseException))


_TIMEOUT_TYPES = (u3e.TimeoutError, TimeoutError)
_SSL_TYPES = (u3e.SSLError, ssl.SSLError, ssl.CertificateError)


def _classify(exc: BaseException) -> tuple[str, bool]:
    """(reason, worth_retrying) for an exception raised while talking HTTP."""
    chain = list(_exception_chain(exc))
    # urllib3's NewConnectionError (refused, unreachable; NameResolutionError: DNS) subclasses
    # ConnectTimeoutError for historical reasons, so test it before the timeout types.
    for e in chain:
        if isinstance(e, u3e.NameResolutionError):  # "try again" is worth it; "no such name" not
            return "connection_error", any(
                isinstance(x, socket.gaierror) and x.errno == socket.EAI_AGAIN for x in chain)
    if any(isinstance(e, u3e.NewConnectionError) for e in chain):
        return "connection_error", False
    if any(isinstance(e, _SSL_TYPES) for e in chain):
        return "connection_error", False
    if any(isinstance(e, _TIMEOUT_TYPES) for e in chain):
        return "timeout", True
    if any(isinstance(e, u3e.LocationValueError) for e in chain):
        return "invalid_url", False
    if any(isinstance(e, u3e.DecodeError) for e in chain):
        return "connection_error", False
    # Connection reset / aborted / body cut short: transient.
    return "connection_error", True


_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>: ")


def _describe(exc: BaseException) -> str:
    """``Type: message`` without urllib3's ``<... object at 0x...>`` noise (stable details)."""
    return f"{type(exc).__name__}: " + _OBJECT_REPR.sub("", str(exc))


def _retry_after_seconds(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def noai_directive(header_values: Iterable[str], cfg: FetchConfig) -> str | None:
    """The opt-out directive in ``X-Robots-Tag`` values that applies to us, or None.

    ``X-Robots-Tag: noai`` applies to every crawler; ``X-Robots-Tag: img2dataset: noai`` only to
    the named one (a user-agent prefix applies to the directives after it in the same value).
    """
    ours = {t.lower() for t in cfg.user_agent_tokens}
    blocked = {d.lower() for d in cfg.noai_directives}
    for value in header_values:
        agent: str | None = None
        for token in value.split(","):
            token = token.strip()
            if ":" in token:
                head, rest = (x.strip().lower() for x in token.split(":", 1))
                if head in _VALUED_DIRECTIVES:
                    directive = head
                else:
                    agent, directive = head, rest
            else:
                directive = token.lower()
            if directive in blocked and (agent is None or agent in ours):
                return directive
    return None


def _discard(resp: Any) -> None:
    """Done with ``resp`` without wanting its body: keep the connection if the rest is small."""
    remaining = resp.length_remaining
    if remaining is not None and remaining <= _DRAIN_LIMIT:
        resp.drain_conn()  # raw reads: nothing is decompressed
    else:
        resp.close()
    resp.release_conn()


def _read_body(resp: Any, cfg: FetchConfig) -> bytes | Reject:
    length = resp.headers.get("Content-Length")
    if length and length.isdigit() and int(length) > cfg.max_bytes:
        resp.close()
        resp.release_conn()
        return _reject("too_large", f"Content-Length {length} > max_bytes {cfg.max_bytes}")
    read = resp.read
    cap = cfg.max_bytes
    parts = []
    total = 0
    while chunk := read(_CHUNK):  # decoded bytes: the cap applies after gzip/deflate
        parts.append(chunk)
        total += len(chunk)
        if total > cap:
            resp.close()
            resp.release_conn()
            return _reject("too_large", f"body exceeds max_bytes {cap}")
    resp.release_conn()
    if not total:
        return _reject("empty_body", f"HTTP {resp.status} with an empty body")
    return parts[0] if len(parts) == 1 else b"".join(parts)


class _Done(Exception):
    """An attempt's final answer, raised out of the redirect loop."""

    def __init__(self, outcome: Reject, retryable: bool = False,
                 retry_after: float | None = None) -> None:
        super().__init__(outcome)
        self.outcome, self.retryable, self.retry_after = outcome, retryable, retry_after


@functools.lru_cache(maxsize=32)
def _headers(user_agent: str) -> dict[str, str]:
    return {"User-Agent": user_agent, "Accept": "*/*", "Accept-Encoding": "gzip, deflate"}


@functools.lru_cache(maxsize=32)
def _timeout(seconds: float) -> urllib3.Timeout:
    return urllib3.Timeout(connect=seconds, read=seconds)


def _attempt(url: str, cfg: FetchConfig, http: urllib3.PoolManager, clock: _Clock,
             attempts: int) -> bytes | Reject:
    """One attempt: follow up to ``max_redirects`` redirects, checking each hop."""
    headers = _headers(cfg.user_agent)
    current = url
    for _ in range(cfg.max_redirects + 1):
        try:
            u = parse_url(current)
        except u3e.LocationParseError as e:
            raise _Done(_reject("invalid_url", _describe(e))) from None
        if not u.host:
            raise _Done(_reject("invalid_url", f"no host in {current[:200]!r}"))
        remaining = clock.deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlinePassed()
        timeout = _timeout(cfg.timeout) if remaining >= cfg.timeout else urllib3.Timeout(
            connect=remaining, read=remaining)
        pool = http.connection_from_host(u.host, u.port, u.scheme)
        clock.phase = "connecting"
        resp = pool.urlopen("GET", u.request_uri, headers=headers, retries=False,
                            redirect=False, assert_same_host=False, timeout=timeout,
                            preload_content=False, decode_content=True)
        clock.phase = "reading the body"
        status = resp.status
        if 200 <= status < 300:
            if cfg.respect_noai:
                directive = noai_directive(resp.headers.getlist("X-Robots-Tag"), cfg)
                if directive is not None:
                    _discard(resp)
                    return _reject("robots_noai", f"X-Robots-Tag: {directive}")
            return _read_body(resp, cfg)
        location = resp.headers.get("Location") if status in _REDIRECT_STATUS else None
        if not location:
            retry_after = _retry_after_seconds(resp.headers.get("Retry-After"))
            _discard(resp)
            raise _Done(_reject(f"http_{status}", f"HTTP {status} after {attempts} attempt(s)"),
                        status in _RETRYABLE_STATUS, retry_after)
        _discard(resp)
        current = urllib.parse.urljoin(current, location.strip())
        scheme = urllib.parse.urlsplit(current).scheme.lower()
        if scheme not in ("http", "https"):
            raise _Done(_reject("unsupported_scheme",
                                f"redirect to a {scheme or 'relative'}: URL refused "
                                f"({current[:200]})"))
    raise _Done(_reject("too_many_redirects", f"more than {cfg.max_redirects} redirects"))


def _fetch_http(url: str, cfg: FetchConfig, http: urllib3.PoolManager) -> bytes | Reject:
    clock = _Clock(cfg)
    _WATCHDOG.watch(clock)
    outer = getattr(_local, "clock", None)
    _local.clock = clock
    try:
        return _attempts(url, cfg, http, clock)
    finally:
        clock.done = True
        _local.clock = outer


def _attempts(url: str, cfg: FetchConfig, http: urllib3.PoolManager,
              clock: _Clock) -> bytes | Reject:
    attempts = 0
    while True:
        attempts += 1
        retry_after: float | None = None
        try:
            outcome = _attempt(url, cfg, http, clock, attempts)
            retryable = False
        except _Done as done:
            outcome, retryable, retry_after = done.outcome, done.retryable, done.retry_after
        except AddressRefused as e:
            return _reject("address_refused", str(e))
        except DeadlinePassed:
            outcome, retryable = _reject("timeout"), False
            clock.expired = True
        except (u3e.HTTPError, HTTPException, OSError) as e:
            reason, retryable = _classify(e)
            outcome = _reject(reason, f"{_describe(e)} (after {attempts} attempt(s))")
            if time.monotonic() >= clock.deadline:  # a socket timeout cut to the deadline
                clock.expired = True
        if clock.expired:
            return _reject("timeout", f"deadline {cfg.deadline}s passed while {clock.phase} "
                                      f"after {attempts} attempt(s)")
        if not retryable or attempts > cfg.retries:
            return outcome
        if retry_after is not None:
            wait = min(retry_after, cfg.max_retry_after)
        else:
            wait = cfg.backoff * 2 ** (attempts - 1)
        if time.monotonic() + wait >= clock.deadline:
            assert isinstance(outcome, Reject)
            return dataclasses.replace(
                outcome, detail=f"{outcome.detail}; no retry: it would pass the deadline "
                                f"{cfg.deadline}s")
        clock.phase = "waiting to retry"
        time.sleep(wait)


# --- files (local, file://, gs://, s3://, ...) ------------------------------------------------


def _file_url_to_path(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"file:// URL with a remote host {parts.netloc!r}")
    return urllib.request.url2pathname(parts.path)


def _split_prefixes(prefixes: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(real paths of the local directories, normalised bucket prefixes)."""
    local, buckets = [], []
    for p in prefixes:
        p = str(p).strip()
        scheme = urllib.parse.urlsplit(p).scheme.lower() if "://" in p else ""
        if scheme == "file":
            local.append(os.path.realpath(_file_url_to_path(p)))
        elif scheme:
            buckets.append(_normalise_bucket_url(p, scheme))
        else:
            local.append(os.path.realpath(p))
    return tuple(local), tuple(buckets)


_prefixes = functools.lru_cache(maxsize=32)(_split_prefixes)


def _is_under(path: str, roots: Iterable[str]) -> bool:
    for root in roots:
        base = root.rstrip(os.sep) + os.sep
        if path == root or path.startswith(base):
            return True
    return False


_FILE_KINDS = (
    (stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
)


def _kind(mode: int) -> str:
    return next((name for test, name in _FILE_KINDS if test(mode)), "special file")


def _fetch_local(path: str, cfg: FetchConfig, deadline: float) -> bytes | Reject:
    roots, _ = _prefixes(cfg.allowed_prefixes)
    real = os.path.realpath(path)
    if not _is_under(real, roots):
        return _reject("path_not_allowed",
                       f"{path} resolves to {real}, outside the allowed path prefixes")
    try:
        st = os.stat(real)
    except (FileNotFoundError, NotADirectoryError) as e:
        return _reject("file_not_found", f"{type(e).__name__}: {e}")
    except OSError as e:
        return _reject("read_error", f"{path}: {type(e).__name__}: {e}")
    if not stat.S_ISREG(st.st_mode):  # refuse before opening: opening a device can act
        return _reject("not_a_regular_file", f"{real} is a {_kind(st.st_mode)}")
    flags = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
             | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
    try:
        fd = os.open(real, flags)  # O_NONBLOCK: a FIFO swapped in meanwhile cannot block
    except FileNotFoundError as e:
        return _reject("file_not_found", f"{type(e).__name__}: {e}")
    except OSError as e:  # ELOOP: a symlink swapped in meanwhile
        return _reject("read_error", f"{path}: {type(e).__name__}: {e}")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return _reject("not_a_regular_file", f"{real} is a {_kind(st.st_mode)}")
        try:  # what was opened, whatever happened to the path since it was checked
            opened = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            opened = real
        if not _is_under(opened, roots):
            return _reject("path_not_allowed", f"{path} opened as {opened}, outside the "
                                               "allowed path prefixes")
        if st.st_size > cfg.max_bytes:
            return _reject("too_large", f"file exceeds max_bytes {cfg.max_bytes}")
        return _read_capped(lambda n: os.read(fd, n), path, cfg, deadline)
    except OSError as e:
        return _reject("read_error", f"{path}: {type(e).__name__}: {e}")
    finally:
        os.close(fd)


def _read_capped(read: Callable[[int], bytes], what: str, cfg: FetchConfig, deadline: float
                 ) -> bytes | Reject:
    """Everything ``read(n)`` gives, in chunks, under the byte cap and the deadline."""
    parts, total = [], 0
    while chunk := read(min(_FILE_CHUNK, cfg.max_bytes + 1 - total)):
        parts.append(chunk)
        total += len(chunk)
        if total > cfg.max_bytes:
            return _reject("too_large", f"file exceeds max_bytes {cfg.max_bytes}")
        if time.monotonic() > deadline:
            return _reject("timeout", f"deadline {cfg.deadline}s passed while reading {what}")
    if not total:
        return _reject("empty_body", f"{what} is empty")
    return b"".join(parts)


def _normalise_bucket_url(url: str, scheme: str) -> str:
    """``scheme://bucket/key`` with ``.`` and ``..`` key segments resolved (scheme lowercased)."""
    bucket, _, key = url.split("://", 1)[1].partition("/")
    segments: list[str] = []
    for seg in key.split("/"):
        if seg == "..":
            if segments:
                segments.pop()
        elif seg != ".":
            segments.append(seg)
    return f"{scheme}://{bucket}/" + "/".join(segments)


def _fetch_bucket(url: str, scheme: str, cfg: FetchConfig, deadline: float) -> bytes | Reject:
    _, prefixes = _prefixes(cfg.allowed_prefixes)
    norm = _normalise_bucket_url(url, scheme)
    if not any(norm.startswith(p if p.endswith("/") else p + "/") or norm == p
               for p in prefixes):
        return _reject("path_not_allowed", f"{norm} is outside the allowed path prefixes")
    try:
        # UNCOMPRESSED: a ``.gz`` image is bytes to hand on, not something to inflate.
        with FileSystems.open(norm, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            return _read_capped(f.read, norm, cfg, deadline)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        return _reject("file_not_found", f"{type(e).__name__}: {e}")
    except Exception as e:  # noqa: BLE001 — Beam wraps I/O errors in its own types
        if not FileSystems.exists(norm):
            return _reject("file_not_found", f"{norm}: {type(e).__name__}: {e}")
        return _reject("read_error", f"{norm}: {type(e).__name__}: {e}")


def _has_beam_filesystem(url: str) -> bool:
    try:
        FileSystems.get_filesystem(url)
    except ValueError:  # no filesystem has this scheme
        return False
    except Exception:  # noqa: BLE001 — a known scheme whose extra is not installed (hdfs)
        return True
    return True


def _fetch_not_http(url: str, scheme: str, cfg: FetchConfig) -> bytes | Reject:
    """Local paths, ``file://`` and bucket URLs: only under ``cfg.allowed_prefixes``."""
    deadline = time.monotonic() + cfg.deadline
    local_roots, bucket_prefixes = _prefixes(cfg.allowed_prefixes)
    if scheme == "file" or scheme == "" or len(scheme) == 1:  # a plain path (``C:`` is one)
        if not local_roots:
            return _reject("unsupported_scheme", _NOT_FETCHED)
        if scheme == "file":
            try:
                path = _file_url_to_path(url)
            except ValueError as e:
                return _reject("unsupported_scheme", str(e))
        else:
            path = url
        return _fetch_local(path, cfg, deadline)
    if "://" in url and any(p.startswith(scheme + "://") for p in bucket_prefixes):
        return _fetch_bucket(url, scheme, cfg, deadline)
    if "://" in url and (scheme in ("gs", "s3", "azfs", "hdfs") or _has_beam_filesystem(url)):
        return _reject("unsupported_scheme", f"scheme {scheme!r}: {_NOT_FETCHED}")
    return _reject("unsupported_scheme", f"scheme {scheme!r}: web rows are fetched over http "
                                         "and https only")


def fetch_url(
    url: str | None, cfg: FetchConfig, http: urllib3.PoolManager | None = None
) -> bytes | Reject:
    """The bytes at ``url``, or a ``Reject`` (stage ``"fetch"``). Never raises for a bad URL.

    ``http`` (from :func:`make_pool_manager`) is reused when given (pass one when fetching many
    URLs); otherwise a throwaway one is made for this call.
    """
    if url is None or not str(url).strip():
        return _reject("missing_url")
    url = str(url).strip()
    try:
        scheme = urllib.parse.urlsplit(url).scheme.lower()
    except ValueError as e:
        return _reject("invalid_url", str(e))
    try:
        if scheme in ("http", "https"):
            if http is not None:
                return _fetch_http(url, cfg, http)
            own = make_pool_manager(cfg)
            try:
                return _fetch_http(url, cfg, own)
            finally:
                own.clear()
        return _fetch_not_http(url, scheme, cfg)
    except Exception as e:  # one bad URL must not take the bundle down
        log.debug("unexpected error fetching %s", url, exc_info=True)
        return _reject("fetch_error", f"{type(e).__name__}: {e}")


class Fetcher:
    """Many fetches in flight from one worker: a pooled ``PoolManager`` and a thread pool.

    Every fetch ends by its deadline, so :meth:`fetch_many` and :meth:`close` do too.

    >>> with Fetcher(FetchConfig(threads=16)) as f:       # doctest: +SKIP
    ...     bodies = f.fetch_many(urls)                   # same order as urls
    """

    def __init__(self, cfg: FetchConfig | None = None) -> None:
        self.cfg = cfg or FetchConfig()
        self.http = make_pool_manager(self.cfg)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.cfg.threads, thread_name_prefix="fetch"
        )
        self._closed = False
        self._lock = threading.Lock()

    def fetch(self, url: str | None) -> bytes | Reject:
        return fetch_url(url, self.cfg, self.http)

    def fetch_many(self, urls: Sequence[str | None],
                   then: Callable[[bytes], Any] | None = None) -> list[Any]:
        """Fetch all ``urls`` concurrently; results are in input order.

        ``then``: applied to each body inside the fetching thread, so that CPU work (decoding:
        PIL releases the GIL) overlaps with the other downloads; a result is then either the
        fetch's ``Reject`` or ``(len(body), then(body))``."""
        return [f.result() for f in [self.submit(url, then) for url in urls]]

    def submit(self, url: str | None, then: Callable[[bytes], Any] | None = None
               ) -> concurrent.futures.Future:
        """Start fetching ``url`` in the pool; the future's result is what :meth:`fetch_many`
        gives for it."""
        if self._closed:
            raise RuntimeError("Fetcher is closed")
        return self._pool.submit(self._fetch_then, url, then)

    def _fetch_then(self, url: str | None, then: Callable[[bytes], Any] | None) -> Any:
        body = self.fetch(url)
        if then is None or isinstance(body, Reject):
            return body
        return len(body), then(body)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.http.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- Beam ---------------------------------------------------------------------------------


def outcome_name(outcome: bytes | Reject) -> str:
    return outcome.reason if isinstance(outcome, Reject) else "ok"


def _decode_share(decode: Any, processes: int) -> Any:
    """``decode`` (an ``ImageConfig``) for one of ``processes`` fetch processes: the decode
    slots (at most that many pictures decoded at once; by default the cores) are the
    machine's, so each process gets its share, and the bound on pictures in decoding stays
    what it is with one process. A ``decode_slots`` given explicitly is kept."""
    if decode is None or decode.decode_slots is not None:
        return decode
    from pipelines import image_guard

    return dataclasses.replace(
        decode, decode_slots=max(1, image_guard.core_count() // max(1, processes)))


def _decoder(decode: Any) -> Callable[[bytes], Any] | None:
    """What each fetched body goes through in its fetching thread: ``images.normalise_image``
    with ``decode`` (an ``ImageConfig``), or nothing when ``decode`` is None."""
    if decode is None:
        return None
    from pipelines.stages import images

    return functools.partial(images.normalise_image, cfg=decode)


def _child_main(conn: Any, inherited: list[Any], cfg: FetchConfig, decode: Any) -> None:
    """A fetch process: lists of ``(token, url)`` in; out, lists of ``(token, ok, result)``
    replies (every fetch that has ended since the last list; ``ok`` False: the text of an
    unexpected exception); ``None`` stops it.

    The objects inherited from the parent (a recipe's worker may hold models) move to the
    collector's permanent generation, so this process's collections never write to their
    pages and they stay shared with the parent instead of being copied."""
    import gc

    for other in inherited:  # the other processes' pipe ends: their EOFs must not wait on us
        other.close()
    gc.freeze()
    fetcher = Fetcher(dataclasses.replace(cfg, processes=1))
    then = _decoder(_decode_share(decode, cfg.processes))
    replies: queue.SimpleQueue = queue.SimpleQueue()

    def send() -> None:
        while (reply := replies.get()) is not None:
            batch = [reply]
            while True:
                try:
                    reply = replies.get_nowait()
                except queue.Empty:
                    break
                if reply is None:
                    replies.put(None)  # stop after this list
                    break
                batch.append(reply)
            try:
                conn.send(batch)
            except (OSError, ValueError):  # the parent has gone
                return

    sender = threading.Thread(target=send, name="fetch-replies", daemon=True)
    sender.start()
    try:
        while (msg := conn.recv()) is not None:
            for token, url in msg:
                fetcher.submit(url, then).add_done_callback(
                    functools.partial(_put_outcome, replies, token, text=True))
    except (EOFError, OSError, KeyboardInterrupt):
        pass
    finally:
        fetcher.close()  # every fetch in flight ends by its deadline
        replies.put(None)
        sender.join()
        conn.close()


def _put_outcome(into: queue.SimpleQueue, token: int, future: concurrent.futures.Future,
                 text: bool = False) -> None:
    """``(token, True, result)`` of a finished fetch, or ``(token, False, exception)`` (its
    text, for a pipe) into ``into``."""
    try:
        into.put((token, True, future.result()))
    except BaseException as e:  # noqa: BLE001 — a bug, not bad input: the DoFn raises it
        into.put((token, False, f"{type(e).__name__}: {e}" if text else e))


class FetchProcesses:
    """``cfg.processes`` forked fetch processes, fed URLs as they come.

    :meth:`submit` hands each URL to the process with the fewest fetches in flight (the URLs
    given together go in one message to each process); as fetches end, ``(token, True,
    result)`` lands in :attr:`results` (the result being what
    ``Fetcher.fetch_many`` gives for the URL, decoded with ``decode``, an ``ImageConfig``,
    when given), or ``(token, False, exception)`` for an unexpected error. A process that
    dies (killed, or crashed in native code) gives a ``RuntimeError`` naming its exit code
    for each fetch it held, and takes no more URLs."""

    def __init__(self, cfg: FetchConfig, decode: Any = None) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("fork")
        n = cfg.processes
        pipes = [ctx.Pipe() for _ in range(n)]
        self._conns = [parent for parent, _ in pipes]
        self._procs = []
        for i, (_, child) in enumerate(pipes):
            inherited = [c for pair in pipes for c in pair if c is not child]
            proc = ctx.Process(target=_child_main, args=(child, inherited, cfg, decode),
                               name=f"fetch-{i}", daemon=True)
            proc.start()
            self._procs.append(proc)
        for _, child in pipes:
            child.close()
        self.results: queue.SimpleQueue = queue.SimpleQueue()
        self._deadline = cfg.deadline
        self._lock = threading.Lock()
        self._where: dict[int, int] = {}  # token -> process
        self._load = [0] * n
        self._alive = [True] * n
        self._closing = False
        self._reader = threading.Thread(target=self._read, name="fetch-results", daemon=True)
        self._reader.start()

    def submit(self, items: Sequence[tuple[int, str | None]]) -> None:
        """Start fetching each ``(token, url)`` of ``items``."""
        with self._lock:
            live = [i for i, alive in enumerate(self._alive) if alive]
            if self._closing or not live:
                raise RuntimeError("the fetch processes are closed" if self._closing else
                                   "every fetch process has died; see the errors above")
            parts: dict[int, list[tuple[int, str | None]]] = {}
            for token, url in items:
                i = min(live, key=self._load.__getitem__)
                self._where[token] = i
                self._load[i] += 1
                parts.setdefault(i, []).append((token, url))
            for i, part in parts.items():
                self._conns[i].send(part)

    def _read(self) -> None:
        from multiprocessing.connection import wait

        live = {conn: i for i, conn in enumerate(self._conns)}
        while live:
            for conn in wait(list(live)):
                try:
                    batch = conn.recv()
                except (EOFError, OSError):
                    self._lost(live.pop(conn))
                    continue
                with self._lock:
                    for token, _, _ in batch:
                        self._load[self._where.pop(token)] -= 1
                for token, ok, value in batch:
                    self.results.put((token, ok, value if ok else RuntimeError(
                        f"fetch process {live[conn]}: {value}")))

    def _lost(self, i: int) -> None:
        """Process ``i``'s pipe closed: it stopped (closing) or died (its fetches fail)."""
        proc = self._procs[i]
        proc.join(1.0)
        with self._lock:
            self._alive[i] = False
            held = [token for token, j in self._where.items() if j == i]
            for token in held:
                del self._where[token]
        if held:
            error = RuntimeError(f"fetch process {proc.name} (pid {proc.pid}) exited with code "
                                 f"{proc.exitcode} holding {len(held)} fetch(es)")
            log.error("%s", error)
            for token in held:
                self.results.put((token, False, error))

    def close(self) -> None:
        """Stop the processes once their fetches in flight end (each by its deadline)."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            for conn in self._conns:
                try:
                    conn.send(None)
                except (OSError, ValueError):
                    pass
        for proc in self._procs:
            proc.join(self._deadline + 10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self._reader.join(10)
        for conn in self._conns:
            conn.close()


class FetchDoFn(beam.DoFn):
    """Records → each record with ``_body`` (main) or its reject row (``rejects``).

    Streams (see the module docs): up to ``in_flight`` fetches (default ``threads x
    processes``) run at once, each record leaves as its own fetch ends, and the bundle's last
    ones leave in ``finish_bundle``. A list of records (``beam.BatchElements``' output) is
    taken too. With ``decode`` (an ``ImageConfig``), each body is decoded where it was
    fetched and the main output is what ``DecodeDoFn`` would have made of it (decode rejects
    go to ``rejects`` with stage ``decode``).
    """

    def __init__(self, cfg: FetchConfig | None = None, decode: Any = None,
                 in_flight: int | None = None) -> None:
        self.cfg = cfg or FetchConfig()
        self.decode = decode
        self.in_flight = in_flight
        self._fetcher: Fetcher | None = None
        self._procs: FetchProcesses | None = None
        self._counters: dict[str, Any] = {}

    def setup(self) -> None:
        if self.cfg.processes > 1:
            self._procs = FetchProcesses(self.cfg, self.decode)
            self._results = self._procs.results
        else:
            self._fetcher = Fetcher(self.cfg)
            self._results = queue.SimpleQueue()
            self._then = _decoder(self.decode)
        self._limit = max(1, self.in_flight or self.cfg.threads * self.cfg.processes)
        # URLs for the fetch processes go in small groups (one message, one wake-up of a
        # process's reader, per group), sent before this thread waits and when one is full
        self._group = max(1, min(16, self._limit // 8))
        self._tokens = itertools.count()
        self._bytes = beam.metrics.Metrics.distribution(STAGE, "bytes")
        self._progress = Progress(STAGE)
        self.start_bundle()

    def start_bundle(self) -> None:
        # a failed attempt's fetches still in flight: their results are dropped on arrival
        self._pending: dict[int, tuple[dict[str, Any], Any]] = {}
        self._unsent: list[tuple[int, str | None]] = []

    def _send(self) -> None:
        if self._unsent:
            assert self._procs is not None
            self._procs.submit(self._unsent)
            self._unsent = []

    def _next(self) -> tuple[int, bool, Any]:
        """The next finished fetch, once every URL handed over is on its way."""
        self._send()
        return self._results.get()

    def teardown(self) -> None:
        if self._fetcher is not None:
            self._fetcher.close()
            self._fetcher = None
        if self._procs is not None:
            self._procs.close()
            self._procs = None

    def _count(self, name: str, stage: str = STAGE) -> None:
        counter = self._counters.get((stage, name))
        if counter is None:
            counter = self._counters[stage, name] = beam.metrics.Metrics.counter(stage, name)
        counter.inc()

    def process(self, element: list[dict[str, Any]] | dict[str, Any],
                timestamp: Any = beam.DoFn.TimestampParam,
                window: Any = beam.DoFn.WindowParam) -> Iterator[Any]:
        if self._fetcher is None and self._procs is None:  # runners call setup()
            self.setup()
        for record in [element] if isinstance(element, dict) else element:
            token = next(self._tokens)
            self._pending[token] = (record, (timestamp, window))
            if self._procs is not None:
                self._unsent.append((token, record.get("url")))
                if len(self._unsent) >= self._group:
                    self._send()
            else:
                assert self._fetcher is not None
                self._fetcher.submit(record.get("url"), self._then).add_done_callback(
                    functools.partial(_put_outcome, self._results, token))
            while len(self._pending) >= self._limit:
                yield from self._emit(self._next())
        while not self._results.empty():  # whatever else has ended meanwhile
            yield from self._emit(self._results.get())

    def finish_bundle(self) -> Iterator[Any]:
        while self._pending:
            yield from self._emit(self._next())

    def _emit(self, result: tuple[int, bool, Any]) -> Iterator[Any]:
        """The outputs of a finished fetch, in the window (and at the timestamp) of its
        record."""
        token, ok, outcome = result
        entry = self._pending.pop(token, None)
        if entry is None:  # a fetch of a failed attempt at an earlier bundle
            return
        if not ok:  # a bug, not bad input: fail the bundle with it
            raise outcome
        record, (timestamp, window) = entry
        if not isinstance(window, BoundedWindow):  # direct use
            timestamp, window = MIN_TIMESTAMP, GlobalWindow()
        emit = self._outputs if self.decode is None else self._decoded_outputs
        for out in emit(record, outcome):
            if isinstance(out, beam.pvalue.TaggedOutput):
                yield beam.pvalue.TaggedOutput(
                    out.tag, WindowedValue(out.value, timestamp, (window,)))
            else:
                yield WindowedValue(out, timestamp, (window,))

    def _outputs(self, record: dict[str, Any], outcome: bytes | Reject) -> Iterator[Any]:
        self._count(outcome_name(outcome))
        self._progress.add(outcome_name(outcome))
        if isinstance(outcome, Reject):
            yield beam.pvalue.TaggedOutput(REJECTS, reject_row(record, outcome))
        else:
            self._bytes.update(len(outcome))
            yield {**record, "_body": outcome}

    def _decoded_outputs(self, record: dict[str, Any], outcome: Any) -> Iterator[Any]:
        from pipelines.stages import images

        if isinstance(outcome, Reject):
            self._count(outcome.reason)
            self._progress.add(outcome.reason)
            yield beam.pvalue.TaggedOutput(REJECTS, reject_row(record, outcome))
            return
        nbytes, result = outcome
        self._count("ok")
        self._progress.add("ok")
        self._bytes.update(nbytes)
        self._count(result.reason if isinstance(result, Reject) else "ok", images.STAGE)
        yield images.decoded_output(record, result, nbytes)


class Fetch(beam.PTransform):
    """Records → ``{"records": records with _body, "rejects": reject rows}`` (a DoOutputsTuple;
    the stage output contract of ``pipelines.records``).

    ``in_flight``: the most fetches at once per worker (default ``cfg.threads x
    cfg.processes``). ``decode``: an ``images.ImageConfig`` to decode each body where it was
    fetched; ``ok`` then holds decoded records (``_image`` and the image fields, no ``_body``)
    and ``rejects`` the decode rejects too.
    """

    def __init__(self, cfg: FetchConfig | None = None, decode: Any = None,
                 in_flight: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg or FetchConfig()
        self.decode = decode
        self.in_flight = in_flight

    def expand(self, records: beam.PCollection) -> Any:
        return records | "Fetch" >> beam.ParDo(
            FetchDoFn(self.cfg, self.decode, self.in_flight)).with_outputs(REJECTS, main=MAIN)
