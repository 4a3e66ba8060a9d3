"""Fetch: turn a record's ``url`` into bytes, or a ``Reject`` saying why not.

The pure part is :func:`fetch_url` (one URL) and :class:`Fetcher` (many URLs in flight from one
worker, like img2dataset's downloader threads). The Beam part is :class:`FetchDoFn`, which takes
a *batch* of records so that a whole batch is downloaded concurrently, and :class:`Fetch`.

Supported URLs: ``http(s)://`` through ``requests`` (streamed, redirects followed, byte cap
enforced while reading, retries with exponential backoff on 429/5xx/timeouts/connection resets,
``Retry-After`` honoured up to a cap, ``X-Robots-Tag: noai``-style opt-outs honoured like
img2dataset); ``file://`` URLs, plain paths and anything Beam's ``FileSystems`` knows
(``gs://``, ``s3://``, ...), byte cap enforced too.

Reject reasons (stage ``"fetch"``): ``missing_url``, ``unsupported_scheme``, ``invalid_url``,
``connection_error``, ``timeout``, ``http_<code>``, ``too_many_redirects``, ``too_large``,
``empty_body``, ``robots_noai``, ``file_not_found``, ``read_error`` and, for anything
unforeseen, ``fetch_error`` (the detail carries the exception). Nothing here raises for a bad URL.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import email.utils
import logging
import socket
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Self

import apache_beam as beam
import requests
import requests.adapters
import requests.auth
import urllib3.exceptions
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipelines.progress import Progress
from pipelines.records import REJECTS, Reject, reject_row

log = logging.getLogger(__name__)

STAGE = "fetch"
DEFAULT_USER_AGENT = (
    "rs-corpus/0.1 (+https://github.com/rs-corpus/rs-corpus; img2dataset-compatible)"
)
# Statuses worth another attempt: the server may answer differently in a moment.
_RETRYABLE_STATUS = frozenset({408, 425, 429}) | frozenset(range(500, 600))
# X-Robots-Tag directives that take a value after a colon (so the colon is not a UA prefix).
_VALUED_DIRECTIVES = frozenset(
    {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}
)
_CHUNK = 64 * 1024


@dataclasses.dataclass(frozen=True)
class FetchConfig:
    """How to download. Defaults follow img2dataset where it has an equivalent flag."""

    timeout: float = 10.0  # seconds per connect and per socket read
    retries: int = 2  # extra attempts on 429/5xx/timeouts/connection resets
    backoff: float = 0.5  # seconds; attempt k waits backoff * 2**(k-1) unless Retry-After says
    max_retry_after: float = 10.0  # cap on an honoured Retry-After, seconds
    total_timeout: float = 60.0  # whole-attempt deadline: guards against drip-fed bodies
    max_bytes: int = 20 * 2**20
    user_agent: str = DEFAULT_USER_AGENT
    respect_noai: bool = True
    noai_directives: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")
    # X-Robots-Tag lines addressed to one of these user-agent tokens apply to us (we are an
    # img2dataset-compatible crawler, so opt-outs aimed at img2dataset are honoured too).
    user_agent_tokens: tuple[str, ...] = ("rs-corpus", "img2dataset")
    threads: int = 64  # requests in flight per worker

    def __post_init__(self) -> None:
        if self.timeout <= 0 or self.total_timeout <= 0:
            raise ValueError("timeouts must be positive")
        if self.retries < 0 or self.backoff < 0 or self.max_retry_after < 0:
            raise ValueError("retries, backoff and max_retry_after must be >= 0")
        if self.max_bytes <= 0 or self.threads <= 0:
            raise ValueError("max_bytes and threads must be positive")


def _reject(reason: str, detail: str | None = None) -> Reject:
    return Reject(stage=STAGE, reason=reason, detail=detail)


# --- HTTP ---------------------------------------------------------------------------------


class _NoCredentials(requests.auth.AuthBase):
    """Sends no credentials. Set on the session so that requests does not look up ``~/.netrc``
    for every URL: a crawler must not hand a user's stored passwords to arbitrary hosts (and
    the lookup, a few file-system calls per request, is measurable at 64 threads)."""

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        return r


def make_session(cfg: FetchConfig) -> requests.Session:
    """A ``requests.Session`` whose connection pool is sized to ``cfg.threads``.

    Proxies from the environment (``HTTP(S)_PROXY``, ``NO_PROXY``) still apply; ``~/.netrc``
    does not (:class:`_NoCredentials`)."""
    session = requests.Session()
    session.auth = _NoCredentials()
    adapter = requests.adapters.HTTPAdapter(
        pool_connections=16, pool_maxsize=cfg.threads, max_retries=0, pool_block=False
    )
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = cfg.user_agent
    return session


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


def _classify(exc: requests.RequestException) -> tuple[str, bool]:
    """(reason, worth_retrying) for an exception raised while talking HTTP."""
    chain = list(_exception_chain(exc))
    # urllib3's NewConnectionError (refused, unreachable; NameResolutionError: DNS) subclasses
    # ConnectTimeoutError for historical reasons, so test it before the timeout types.
    if any(isinstance(e, urllib3.exceptions.NewConnectionError) for e in chain):
        return "connection_error", False
    if isinstance(exc, requests.exceptions.SSLError):
        return "connection_error", False
    timeout_types = (requests.Timeout, urllib3.exceptions.TimeoutError, socket.timeout)
    if any(isinstance(e, timeout_types) for e in chain):
        return "timeout", True
    if isinstance(exc, requests.TooManyRedirects):
        return "too_many_redirects", False
    if isinstance(
        exc,
        (
            requests.exceptions.InvalidURL,
            requests.exceptions.MissingSchema,
            requests.exceptions.InvalidSchema,
            requests.exceptions.InvalidHeader,
        ),
    ):
        return "invalid_url", False
    if isinstance(exc, requests.exceptions.ContentDecodingError):
        return "connection_error", False
    # Connection reset / aborted / chunked body cut short: transient.
    return "connection_error", True


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


def _robots_values(resp: requests.Response) -> list[str]:
    raw_headers = getattr(resp.raw, "headers", None)
    if raw_headers is not None and hasattr(raw_headers, "getlist"):
        return list(raw_headers.getlist("X-Robots-Tag"))  # each header line separately
    value = resp.headers.get("X-Robots-Tag")
    return [value] if value else []


class _Deadline(Exception):
    """The whole-attempt deadline passed while reading the body."""


def _read_body(resp: requests.Response, cfg: FetchConfig, deadline: float) -> bytes | Reject:
    length = resp.headers.get("Content-Length")
    if length and length.isdigit() and int(length) > cfg.max_bytes:
        return _reject("too_large", f"Content-Length {length} > max_bytes {cfg.max_bytes}")
    buf = bytearray()
    for chunk in resp.iter_content(chunk_size=_CHUNK):
        buf += chunk
        if len(buf) > cfg.max_bytes:
            return _reject("too_large", f"body exceeds max_bytes {cfg.max_bytes}")
        if time.monotonic() > deadline:
            raise _Deadline()
    if not buf:
        return _reject("empty_body", f"HTTP {resp.status_code} with an empty body")
    return bytes(buf)


def _fetch_http(url: str, cfg: FetchConfig, session: requests.Session) -> bytes | Reject:
    attempts = 0
    while True:
        attempts += 1
        retry_after: float | None = None
        try:
            with session.get(
                url,
                timeout=(cfg.timeout, cfg.timeout),
                stream=True,
                allow_redirects=True,
                headers={"User-Agent": cfg.user_agent},
            ) as resp:
                status = resp.status_code
                if not 200 <= status < 300:
                    outcome: bytes | Reject = _reject(
                        f"http_{status}", f"HTTP {status} after {attempts} attempt(s)"
                    )
                    retryable = status in _RETRYABLE_STATUS
                    retry_after = _retry_after_seconds(resp.headers.get("Retry-After"))
                else:
                    directive = (
                        noai_directive(_robots_values(resp), cfg) if cfg.respect_noai else None
                    )
                    if directive is not None:
                        return _reject("robots_noai", f"X-Robots-Tag: {directive}")
                    return _read_body(resp, cfg, time.monotonic() + cfg.total_timeout)
        except _Deadline:
            outcome = _reject(
                "timeout", f"body not read within {cfg.total_timeout}s after {attempts} attempt(s)"
            )
            retryable = True
        except requests.RequestException as e:
            reason, retryable = _classify(e)
            outcome = _reject(reason, f"{type(e).__name__} after {attempts} attempt(s): {e}")
        if not retryable or attempts > cfg.retries:
            return outcome
        if retry_after is not None:
            wait = min(retry_after, cfg.max_retry_after)
        else:
            wait = cfg.backoff * 2 ** (attempts - 1)
        time.sleep(wait)


# --- files (local, file://, gs://, s3://, ...) ------------------------------------------------


def _file_url_to_path(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"file:// URL with a remote host {parts.netloc!r}")
    return urllib.request.url2pathname(parts.path)


def _fetch_file(path: str, cfg: FetchConfig) -> bytes | Reject:
    try:
        # UNCOMPRESSED: a ``.gz`` image is bytes to hand on, not something to inflate.
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            data = f.read(cfg.max_bytes + 1)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        return _reject("file_not_found", f"{type(e).__name__}: {e}")
    except Exception as e:  # noqa: BLE001 — Beam wraps I/O errors in its own types
        if not FileSystems.exists(path):
            return _reject("file_not_found", f"{path}: {type(e).__name__}: {e}")
        return _reject("read_error", f"{path}: {type(e).__name__}: {e}")
    if len(data) > cfg.max_bytes:
        return _reject("too_large", f"file exceeds max_bytes {cfg.max_bytes}")
    if not data:
        return _reject("empty_body", f"{path} is empty")
    return data


def _has_beam_filesystem(url: str) -> bool:
    try:
        FileSystems.get_filesystem(url)
    except ValueError:
        return False
    return True


def fetch_url(
    url: str | None, cfg: FetchConfig, session: requests.Session | None = None
) -> bytes | Reject:
    """The bytes at ``url``, or a ``Reject`` (stage ``"fetch"``). Never raises for a bad URL.

    ``session`` is reused when given (pass one when fetching many URLs); otherwise a throwaway
    session is made for this call.
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
            if session is not None:
                return _fetch_http(url, cfg, session)
            with make_session(cfg) as own:
                return _fetch_http(url, cfg, own)
        if scheme == "file":
            try:
                path = _file_url_to_path(url)
            except ValueError as e:
                return _reject("unsupported_scheme", str(e))
            return _fetch_file(path, cfg)
        if scheme == "" or len(scheme) == 1:  # a plain path (``C:`` counts as one)
            return _fetch_file(url, cfg)
        if "://" in url and _has_beam_filesystem(url):  # gs://, s3://, hdfs://, azfs://
            return _fetch_file(url, cfg)
        return _reject("unsupported_scheme", f"scheme {scheme!r}")
    except Exception as e:  # one bad URL must not take the bundle down
        log.debug("unexpected error fetching %s", url, exc_info=True)
        return _reject("fetch_error", f"{type(e).__name__}: {e}")


class Fetcher:
    """Many fetches in flight from one worker: a pooled session and a thread pool.

    >>> with Fetcher(FetchConfig(threads=16)) as f:       # doctest: +SKIP
    ...     bodies = f.fetch_many(urls)                   # same order as urls
    """

    def __init__(self, cfg: FetchConfig | None = None) -> None:
        self.cfg = cfg or FetchConfig()
        self.session = make_session(self.cfg)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.cfg.threads, thread_name_prefix="fetch"
        )
        self._closed = False
        self._lock = threading.Lock()

    def fetch(self, url: str | None) -> bytes | Reject:
        return fetch_url(url, self.cfg, self.session)

    def fetch_many(self, urls: Sequence[str | None],
                   then: Callable[[bytes], Any] | None = None) -> list[Any]:
        """Fetch all ``urls`` concurrently; results are in input order.

        ``then``: applied to each body inside the fetching thread, so that CPU work (decoding:
        PIL releases the GIL) overlaps with the other downloads; a result is then either the
        fetch's ``Reject`` or ``(len(body), then(body))``."""
        if self._closed:
            raise RuntimeError("Fetcher is closed")
        if then is None:
            return list(self._pool.map(self.fetch, urls))

        def fetch_then(url: str | None) -> Any:
            body = self.fetch(url)
            return body if isinstance(body, Reject) else (len(body), then(body))

        return list(self._pool.map(fetch_then, urls))

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.session.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- Beam ---------------------------------------------------------------------------------


def outcome_name(outcome: bytes | Reject) -> str:
    return outcome.reason if isinstance(outcome, Reject) else "ok"


class FetchDoFn(beam.DoFn):
    """Batch of records → each record with ``_body`` (main) or its reject row (``rejects``).

    Takes the lists that ``beam.BatchElements`` produces so that a whole batch is in flight at
    once; a single record (a dict) is accepted too. With ``decode`` (an ``ImageConfig``), each
    body is decoded in its fetching thread and the main output is what ``DecodeDoFn`` would
    have made of it (decode rejects go to ``rejects`` with stage ``decode``).
    """

    def __init__(self, cfg: FetchConfig | None = None, decode: Any = None) -> None:
        self.cfg = cfg or FetchConfig()
        self.decode = decode
        self._fetcher: Fetcher | None = None
        self._counters: dict[str, Any] = {}

    def setup(self) -> None:
        self._fetcher = Fetcher(self.cfg)
        self._bytes = beam.metrics.Metrics.distribution(STAGE, "bytes")
        self._progress = Progress(STAGE)

    def teardown(self) -> None:
        if self._fetcher is not None:
            self._fetcher.close()
            self._fetcher = None

    def _count(self, name: str, stage: str = STAGE) -> None:
        counter = self._counters.get((stage, name))
        if counter is None:
            counter = self._counters[stage, name] = beam.metrics.Metrics.counter(stage, name)
        counter.inc()

    def process(self, batch: list[dict[str, Any]] | dict[str, Any]) -> Iterator[Any]:
        records = [batch] if isinstance(batch, dict) else list(batch)
        if self._fetcher is None:  # runners call setup(); this is for direct use
            self.setup()
        assert self._fetcher is not None
        urls = [r.get("url") for r in records]
        if self.decode is not None:
            yield from self._fetch_and_decode(records, urls)
            return
        outcomes = self._fetcher.fetch_many(urls)
        for record, outcome in zip(records, outcomes, strict=True):
            self._count(outcome_name(outcome))
            self._progress.add(outcome_name(outcome))
            if isinstance(outcome, Reject):
                yield beam.pvalue.TaggedOutput(REJECTS, reject_row(record, outcome))
            else:
                self._bytes.update(len(outcome))
                yield {**record, "_body": outcome}

    def _fetch_and_decode(self, records: list[dict[str, Any]], urls: list[Any]) -> Iterator[Any]:
        from pipelines.stages import images

        cfg = self.decode
        outcomes = self._fetcher.fetch_many(urls, lambda body: images.normalise_image(body, cfg))
        for record, outcome in zip(records, outcomes, strict=True):
            if isinstance(outcome, Reject):
                self._count(outcome.reason)
                self._progress.add(outcome.reason)
                yield beam.pvalue.TaggedOutput(REJECTS, reject_row(record, outcome))
                continue
            nbytes, result = outcome
            self._count("ok")
            self._progress.add("ok")
            self._bytes.update(nbytes)
            self._count(result.reason if isinstance(result, Reject) else "ok", images.STAGE)
            yield images.decoded_output(record, result, nbytes)


class Fetch(beam.PTransform):
    """Records → ``{"ok": records with _body, "rejects": reject rows}`` (a DoOutputsTuple).

    ``batch_size`` records are fetched concurrently per call (default: ``cfg.threads``).
    ``decode``: an ``images.ImageConfig`` to decode each body in its fetching thread; ``ok``
    then holds decoded records (``_image`` and the image fields, no ``_body``) and
    ``rejects`` the decode rejects too.
    """

    def __init__(self, cfg: FetchConfig | None = None, batch_size: int | None = None,
                 decode: Any = None) -> None:
        super().__init__()
        self.cfg = cfg or FetchConfig()
        self.batch_size = batch_size or self.cfg.threads
        self.decode = decode

    def expand(self, records: beam.PCollection) -> Any:
        return (
            records
            | "Batch"
            >> beam.BatchElements(min_batch_size=self.batch_size, max_batch_size=self.batch_size)
            | "Fetch" >> beam.ParDo(FetchDoFn(self.cfg, self.decode))
            .with_outputs(REJECTS, main="ok")
        )
