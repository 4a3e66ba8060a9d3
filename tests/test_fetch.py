"""The fetch stage against a real HTTP server on 127.0.0.1 (the DemoServer).

The server is on loopback, which the address guard refuses by default: every config here that
fetches from it lists ``127.0.0.0/8`` in ``allow_networks`` (the hostile cases, the guard
itself included, are in ``test_fetch_hostile.py``)."""

from __future__ import annotations

import os
import re
import socket
import threading
import time

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines.demo.server import DemoServer, PortInUseError
from pipelines.records import REJECTS, Reject
from pipelines.stages.fetch import (
    DEFAULT_USER_AGENT,
    Fetch,
    FetchConfig,
    FetchDoFn,
    Fetcher,
    fetch_url,
    make_pool_manager,
    noai_directive,
)

# The demo server is on loopback: exempt it from the address guard.
LOOPBACK = ("127.0.0.0/8",)
# Fast retries so the suite stays quick; the retry *count* is what the tests check.
FAST = FetchConfig(timeout=5.0, retries=2, backoff=0.01, allow_networks=LOOPBACK)


def body_of(demo_root, name):
    return (demo_root / "img" / name).read_bytes()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- success and HTTP statuses -------------------------------------------------------------


def test_success_returns_exact_bytes(demo_server, demo_root):
    got = fetch_url(demo_server.url("/img/a.jpg"), FAST)
    assert got == body_of(demo_root, "a.jpg")
    assert demo_server.requests["/img/a.jpg"] == 1


def test_404_is_not_retried(demo_server):
    got = fetch_url(demo_server.url("/img/nope.jpg"), FAST)
    assert isinstance(got, Reject)
    assert (got.stage, got.reason) == ("fetch", "http_404")
    assert demo_server.requests["/img/nope.jpg"] == 1


@pytest.mark.parametrize("code", [500, 503])
def test_5xx_is_retried_then_rejected(demo_server, code):
    got = fetch_url(demo_server.url(f"/status/{code}"), FAST)
    assert isinstance(got, Reject)
    assert got.reason == f"http_{code}"
    assert "3 attempt" in got.detail
    assert demo_server.requests[f"/status/{code}"] == 1 + FAST.retries


def test_retries_zero_means_one_attempt(demo_server):
    got = fetch_url(demo_server.url("/status/503"), FetchConfig(retries=0, allow_networks=LOOPBACK))
    assert got.reason == "http_503"
    assert demo_server.requests["/status/503"] == 1


def test_flaky_succeeds_after_retries(demo_server, demo_root):
    got = fetch_url(demo_server.url("/flaky/2/img/a.jpg"), FAST)
    assert got == body_of(demo_root, "a.jpg")
    assert demo_server.requests["/flaky/2/img/a.jpg"] == 3


def test_flaky_beyond_retries_is_rejected(demo_server):
    got = fetch_url(demo_server.url("/flaky/5/img/a.jpg"), FAST)
    assert got.reason == "http_503"
    assert demo_server.requests["/flaky/5/img/a.jpg"] == 3


def sleeps(monkeypatch):
    """Record the back-off sleeps of the fetch module instead of sleeping."""
    import pipelines.stages.fetch as fetch_module

    slept: list[float] = []
    monkeypatch.setattr(fetch_module.time, "sleep", slept.append)
    return slept


def test_ratelimit_429_is_retried_honouring_retry_after(demo_server, demo_root, monkeypatch):
    # backoff is huge: only honouring "Retry-After: 0" gives a short wait
    slept = sleeps(monkeypatch)
    cfg = FetchConfig(retries=1, backoff=30.0, allow_networks=LOOPBACK)
    got = fetch_url(demo_server.url("/ratelimit/img/b.png"), cfg)
    assert slept and max(slept) < 1.0
    assert got == body_of(demo_root, "b.png")
    assert demo_server.requests["/ratelimit/img/b.png"] == 2


def test_redirect_is_followed(demo_server, demo_root):
    got = fetch_url(demo_server.url("/redirect/img/c.jpg"), FAST)
    assert got == body_of(demo_root, "c.jpg")
    assert demo_server.requests["/redirect/img/c.jpg"] == 1
    assert demo_server.requests["/img/c.jpg"] == 1


# --- network failures ----------------------------------------------------------------------


def test_slow_server_times_out(demo_server):
    cfg = FetchConfig(timeout=0.5, retries=1, backoff=0.01, allow_networks=LOOPBACK)
    got = fetch_url(demo_server.url("/slow/3/img/a.jpg"), cfg)
    assert isinstance(got, Reject) and got.reason == "timeout"
    assert "2 attempt" in got.detail
    assert demo_server.requests["/slow/3/img/a.jpg"] == 2  # timeouts are retried


def test_connection_refused(demo_server, monkeypatch):
    slept = sleeps(monkeypatch)
    got = fetch_url(f"http://127.0.0.1:{closed_port()}/img/a.jpg", FAST)
    assert isinstance(got, Reject)
    assert (got.stage, got.reason) == ("fetch", "connection_error")
    assert slept == []  # refused is not worth retrying with backoff


# --- body checks ---------------------------------------------------------------------------


def test_byte_cap_rejects_too_large(demo_server, demo_root):
    size = len(body_of(demo_root, "a.jpg"))
    got = fetch_url(demo_server.url("/img/a.jpg"),
                    FetchConfig(max_bytes=size - 1, allow_networks=LOOPBACK))
    assert isinstance(got, Reject) and got.reason == "too_large"
    assert fetch_url(demo_server.url("/img/a.jpg"),
                     FetchConfig(max_bytes=size, allow_networks=LOOPBACK)) == body_of(
        demo_root, "a.jpg"
    )


def test_empty_body(demo_server):
    got = fetch_url(demo_server.url("/empty"), FAST)
    assert isinstance(got, Reject) and got.reason == "empty_body"


def test_html_labelled_as_jpeg_is_fetched_as_is(demo_server):
    # Fetch does not judge content; the decode stage rejects it as not_an_image.
    got = fetch_url(demo_server.url("/html"), FAST)
    assert isinstance(got, bytes) and got.startswith(b"<!doctype html>")


def test_noai_header_is_respected(demo_server, demo_root):
    got = fetch_url(demo_server.url("/noai/img/a.jpg"), FAST)
    assert isinstance(got, Reject) and got.reason == "robots_noai"
    assert "noai" in got.detail
    allowed = fetch_url(demo_server.url("/noai/img/a.jpg"), FetchConfig(respect_noai=False,
                                                                     allow_networks=LOOPBACK))
    assert allowed == body_of(demo_root, "a.jpg")


@pytest.mark.parametrize(
    "values, expected",
    [
        (["noai"], "noai"),
        (["NoImageIndex"], "noimageindex"),
        (["noarchive, noindex"], "noindex"),
        (["googlebot: noindex"], None),  # addressed to someone else
        (["img2dataset: noai"], "noai"),  # addressed to img2dataset-compatible crawlers
        (["rs-corpus: noimageai"], "noimageai"),
        (["googlebot: noindex", "noai"], "noai"),
        (["unavailable_after: 25 Jun 2010 15:00:00 PST"], None),
        (["nofollow"], None),
        ([], None),
    ],
)
def test_noai_directive_parsing(values, expected):
    assert noai_directive(values, FetchConfig()) == expected


def test_user_agent_header_is_sent(demo_server):
    fetch_url(demo_server.url("/img/a.jpg"), FAST)
    assert demo_server.last_headers["/img/a.jpg"]["User-Agent"] == DEFAULT_USER_AGENT
    custom = FetchConfig(user_agent="rs-corpus-test/1.0", allow_networks=LOOPBACK)
    fetch_url(demo_server.url("/img/b.png"), custom)
    assert demo_server.last_headers["/img/b.png"]["User-Agent"] == "rs-corpus-test/1.0"


# --- non-HTTP URLs -------------------------------------------------------------------------


# Local files are read only under allowed_prefixes (web rows: http(s) only by default).


def test_file_url_and_plain_path(demo_root):
    path = demo_root / "img" / "b.png"
    cfg = FetchConfig(allowed_prefixes=(str(demo_root),))
    assert fetch_url(path.as_uri(), cfg) == path.read_bytes()
    assert fetch_url(str(path), cfg) == path.read_bytes()


def test_missing_file(demo_root):
    cfg = FetchConfig(allowed_prefixes=(str(demo_root),))
    for url in [(demo_root / "img" / "nope.png").as_uri(), str(demo_root / "nope.png")]:
        got = fetch_url(url, cfg)
        assert isinstance(got, Reject) and got.reason == "file_not_found", url


def test_file_byte_cap_and_empty_file(tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * 1000)
    allowed = (str(tmp_path),)
    assert fetch_url(str(big), FetchConfig(max_bytes=999, allowed_prefixes=allowed)).reason == (
        "too_large")
    assert fetch_url(str(big), FetchConfig(max_bytes=1000, allowed_prefixes=allowed)) == (
        b"x" * 1000)
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert fetch_url(str(empty), FetchConfig(allowed_prefixes=allowed)).reason == "empty_body"


@pytest.mark.parametrize("url", [None, "", "   "])
def test_missing_url(url):
    got = fetch_url(url, FAST)
    assert isinstance(got, Reject) and (got.stage, got.reason) == ("fetch", "missing_url")


@pytest.mark.parametrize(
    "url", ["ftp://example.com/a.jpg", "data:image/png;base64,AAAA", "mailto:someone@example.com"]
)
def test_unsupported_scheme(url):
    got = fetch_url(url, FAST)
    assert isinstance(got, Reject) and got.reason == "unsupported_scheme"


def test_malformed_http_url_is_rejected_not_raised():
    got = fetch_url("http://", FAST)
    assert isinstance(got, Reject) and got.reason == "invalid_url"


# --- many at once --------------------------------------------------------------------------


def test_fetch_many_keeps_input_order_and_runs_concurrently(demo_server, demo_root):
    names = ["a.jpg", "b.png", "c.jpg"]
    urls, expected = [], []
    for i in range(24):
        name = names[i % 3]
        # Every third URL is slow; run serially these would take 8 * 0.4 = 3.2 s.
        path = f"/slow/0.4/img/{name}" if i % 3 == 0 else f"/img/{name}"
        urls.append(demo_server.url(path) + f"?i={i}")
        expected.append(body_of(demo_root, name))
    urls.insert(5, demo_server.url("/img/missing.jpg"))
    expected.insert(5, "http_404")
    urls.insert(9, None)
    expected.insert(9, "missing_url")
    with Fetcher(FetchConfig(threads=32, retries=0, allow_networks=LOOPBACK)) as fetcher:
        got = fetcher.fetch_many(urls)
    assert [g.reason if isinstance(g, Reject) else g for g in got] == expected
    # the eight 0.4 s requests were in flight together, not one after another
    assert demo_server.max_in_flight >= 8
    assert demo_server.requests["/slow/0.4/img/a.jpg"] == 8


def test_slow_request_does_not_block_others(demo_server):
    cfg = FetchConfig(timeout=5.0, allow_networks=LOOPBACK)
    done = {}

    def slow():
        done["slow"] = fetch_url(demo_server.url("/slow/1.5/img/a.jpg"), cfg)

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.1)
    assert isinstance(fetch_url(demo_server.url("/img/b.png"), cfg), bytes)
    assert t.is_alive(), "the fast request waited for the slow one"
    t.join()
    assert isinstance(done["slow"], bytes)


# --- the server itself ---------------------------------------------------------------------


def test_server_port_in_use_is_a_clear_error(demo_server, demo_root):
    with pytest.raises(PortInUseError, match="already in use"):
        DemoServer(demo_root, port=demo_server.port).start()


def test_server_stops_promptly_with_a_sleeper_in_flight(demo_root):
    srv = DemoServer(demo_root).start()
    result = {}
    cfg = FetchConfig(timeout=30.0, retries=0, allow_networks=LOOPBACK)
    t = threading.Thread(
        target=lambda: result.update(r=fetch_url(srv.url("/slow/60/img/a.jpg"), cfg))
    )
    t.start()
    time.sleep(0.2)
    srv.stop()
    t.join(timeout=5)  # the sleeper has 60 s to go: only a prompt stop ends it in time
    assert not t.is_alive()
    assert isinstance(result["r"], Reject)


def test_server_routes(demo_server):
    import requests

    r = requests.get(demo_server.url("/img/a.jpg"), timeout=5)
    assert (r.status_code, r.headers["Content-Type"]) == (200, "image/jpeg")
    r = requests.get(demo_server.url("/img/b.png"), timeout=5)
    assert r.headers["Content-Type"] == "image/png"
    assert requests.get(demo_server.url("/img/../conftest.py"), timeout=5).status_code == 404
    assert requests.get(demo_server.url("/status/418"), timeout=5).status_code == 418
    r = requests.get(demo_server.url("/redirect/img/a.jpg"), timeout=5, allow_redirects=False)
    assert (r.status_code, r.headers["Location"]) == (302, "/img/a.jpg")
    r = requests.get(demo_server.url("/noai/img/a.jpg"), timeout=5)
    assert r.headers["X-Robots-Tag"] == "noai"
    r = requests.get(demo_server.url("/html"), timeout=5)
    assert r.headers["Content-Type"] == "image/jpeg" and b"<html>" in r.content
    r = requests.get(demo_server.url("/empty"), timeout=5)
    assert (r.status_code, r.content) == (200, b"")
    r = requests.get(demo_server.url("/ratelimit/img/a.jpg"), timeout=5)
    assert (r.status_code, r.headers["Retry-After"]) == (429, "0")
    assert requests.get(demo_server.url("/ratelimit/img/a.jpg"), timeout=5).status_code == 200
    assert demo_server.requests["/ratelimit/img/a.jpg"] == 2


# --- Beam ----------------------------------------------------------------------------------


def record(key, url):
    return {
        "key": key,
        "subset": "t",
        "source": "demo",
        "source_id": key,
        "url": url,
        "caption": f"caption {key}",
    }


def test_fetch_dofn_direct(demo_server, demo_root):
    """Called directly (no runner): records leave from ``process`` as their fetches end and
    the rest from ``finish_bundle``, each in the global window."""
    from apache_beam.transforms.window import GlobalWindow

    fn = FetchDoFn(FAST)
    fn.setup()
    try:
        out = list(
            fn.process(
                [
                    record("k1", demo_server.url("/img/a.jpg")),
                    record("k2", demo_server.url("/status/404")),
                ]
            )
        )
        out += list(fn.finish_bundle())
    finally:
        fn.teardown()
    assert all(o.windows == (GlobalWindow(),) for o in
               (x.value if isinstance(x, beam.pvalue.TaggedOutput) else x for x in out))
    main = [o.value for o in out if not isinstance(o, beam.pvalue.TaggedOutput)]
    rejects = [o for o in out if isinstance(o, beam.pvalue.TaggedOutput)]
    assert len(main) == 1 and len(rejects) == 1
    assert main[0]["_body"] == body_of(demo_root, "a.jpg") and main[0]["key"] == "k1"
    assert rejects[0].tag == REJECTS
    assert (rejects[0].value.value["key"], rejects[0].value.value["reason"]) == ("k2", "http_404")


def test_fetch_transform_in_a_pipeline(demo_server, demo_root):
    records = [
        record("k1", demo_server.url("/img/a.jpg")),
        record("k2", demo_server.url("/img/b.png")),
        record("k3", demo_server.url("/img/gone.jpg")),
        record("k4", None),
        record("k5", demo_server.url("/noai/img/c.jpg")),
        record("k6", demo_server.url("/redirect/img/c.jpg")),
    ]
    sizes = {n: len(body_of(demo_root, n)) for n in ("a.jpg", "b.png", "c.jpg")}
    with TestPipeline() as p:
        out = p | beam.Create(records) | Fetch(FAST, in_flight=4)
        ok = out.records | "OkKeys" >> beam.Map(lambda r: (r["key"], len(r["_body"]), r["caption"]))
        rejects = out[REJECTS] | "RejectKeys" >> beam.Map(
            lambda r: (r["key"], r["stage"], r["reason"])
        )
        assert_that(
            ok,
            equal_to(
                [
                    ("k1", sizes["a.jpg"], "caption k1"),
                    ("k2", sizes["b.png"], "caption k2"),
                    ("k6", sizes["c.jpg"], "caption k6"),
                ]
            ),
            label="ok",
        )
        assert_that(
            rejects,
            equal_to(
                [
                    ("k3", "fetch", "http_404"),
                    ("k4", "fetch", "missing_url"),
                    ("k5", "fetch", "robots_noai"),
                ]
            ),
            label="rejects",
        )


def test_progress_logs_counts_and_rate(caplog):
    import logging

    from pipelines.progress import Progress

    p = Progress("fetch", every=0.0)
    with caplog.at_level(logging.INFO, logger="pipelines.progress"):
        p.add("ok")
        p.add("http_404")
        p.add("ok")
    assert "fetch: 3 done" in caplog.records[-1].getMessage()
    assert "ok 2, http_404 1" in caplog.records[-1].getMessage()


def test_fetch_with_decode_equals_fetch_then_decode(demo_server):
    """Decoding inside the fetch threads gives what a separate decode stage gives."""
    from pipelines.stages.images import DecodeDoFn, ImageConfig

    records = [
        record("k1", demo_server.url("/img/a.jpg")),
        record("k2", demo_server.url("/img/b.png")),
        record("k3", demo_server.url("/img/gone.jpg")),  # fetch reject
        record("k4", demo_server.url("/html")),  # decode reject: not an image
        record("k5", demo_server.url("/img/c.jpg")),
    ]
    cfg = ImageConfig(image_size=64)

    def rows(pcoll, label):
        return pcoll | label >> beam.Map(lambda r: tuple(sorted(
            (k, v if not isinstance(v, float) else round(v, 6)) for k, v in r.items()
            if k not in ("detail",))))

    with TestPipeline() as p:
        src = p | beam.Create(records)
        together = src | "Together" >> Fetch(FAST, in_flight=4, decode=cfg)
        apart = src | "Apart" >> Fetch(FAST, in_flight=4)
        decoded = apart.records | beam.ParDo(DecodeDoFn(cfg)).with_outputs(REJECTS, main="records")
        want_ok = rows(decoded.records, "WantOk") | "WantOkList" >> beam.combiners.ToList()
        want_rej = ((apart[REJECTS], decoded[REJECTS]) | beam.Flatten()
                    | "WantRej" >> beam.Map(lambda r: (r["key"], r["stage"], r["reason"]))
                    | "WantRejList" >> beam.combiners.ToList())
        got_ok = rows(together.records, "GotOk") | "GotOkList" >> beam.combiners.ToList()
        got_rej = (together[REJECTS]
                   | "GotRej" >> beam.Map(lambda r: (r["key"], r["stage"], r["reason"]))
                   | "GotRejList" >> beam.combiners.ToList())

        def same(pair):
            a, b = pair
            assert sorted(a) == sorted(b) and a, (a, b)

        _ = ((got_ok, want_ok) | "OkPair" >> beam.Flatten()
             | "OkAll" >> beam.combiners.ToList() | "OkSame" >> beam.Map(same))
        _ = ((got_rej, want_rej) | "RejPair" >> beam.Flatten()
             | "RejAll" >> beam.combiners.ToList() | "RejSame" >> beam.Map(same))
        assert_that(got_rej | "RejSorted" >> beam.Map(sorted),
                    equal_to([[("k3", "fetch", "http_404"), ("k4", "decode", "not_an_image")]]),
                    label="rejects")


def test_netrc_credentials_are_never_sent(demo_server, tmp_path, monkeypatch):
    """A ~/.netrc entry for the host must not turn into an Authorization header (checked on what
    the server received; the redirect case is in test_fetch_hostile.py)."""
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine 127.0.0.1 login user password secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("HOME", str(tmp_path))
    import requests

    plain = requests.Session().get(demo_server.url("/img/b.png"), timeout=5)
    # requests alone would send the netrc login: the .netrc is effective
    assert plain.ok and "Authorization" in demo_server.last_headers["/img/b.png"]
    out = fetch_url(demo_server.url("/img/a.jpg"), FAST, make_pool_manager(FAST))
    assert isinstance(out, bytes) and demo_server.requests["/img/a.jpg"] == 1
    assert "Authorization" not in demo_server.last_headers["/img/a.jpg"]


# --- redirects, compression, name resolution, the deadline -----------------------------------


def test_redirect_chain_is_limited(demo_server, demo_root):
    assert fetch_url(demo_server.url("/redirects/10/img/a.jpg"), FAST) == body_of(
        demo_root, "a.jpg")
    got = fetch_url(demo_server.url("/redirects/11/img/b.png"), FAST)
    assert isinstance(got, Reject) and got.reason == "too_many_redirects"
    assert demo_server.requests["/img/b.png"] == 0
    short = FetchConfig(max_redirects=1, allow_networks=LOOPBACK)
    assert fetch_url(demo_server.url("/redirects/2/img/c.jpg"), short).reason == (
        "too_many_redirects")


def test_gzip_body_is_decoded(demo_server, demo_root):
    assert fetch_url(demo_server.url("/gzip/img/a.jpg"), FAST) == body_of(demo_root, "a.jpg")


def test_gzip_bomb_is_capped_on_decoded_bytes(demo_server):
    import tracemalloc

    cfg = FetchConfig(max_bytes=2**20, allow_networks=LOOPBACK)
    tracemalloc.start()
    try:
        got = fetch_url(demo_server.url("/gzip-bomb/256"), cfg)  # 256 MB of zeros, ~250 KB sent
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(got, Reject) and got.reason == "too_large"
    assert "body exceeds max_bytes" in got.detail
    assert peak < 32 * 2**20, f"{peak / 2**20:.0f} MiB held while reading a capped bomb"


@pytest.mark.parametrize("code, retried", [(socket.EAI_NONAME, False), (socket.EAI_AGAIN, True)])
def test_dns_failure_is_a_connection_error(monkeypatch, code, retried):
    slept = sleeps(monkeypatch)
    looked_up = []

    def failing(host, *args, **kwargs):
        looked_up.append(host)
        raise socket.gaierror(code, "fake resolver failure")

    monkeypatch.setattr(socket, "getaddrinfo", failing)
    got = fetch_url("http://no-such-host.example/a.jpg", FAST)
    assert isinstance(got, Reject) and got.reason == "connection_error"
    assert "Failed to resolve 'no-such-host.example'" in got.detail
    assert len(looked_up) == (1 + FAST.retries if retried else 1)  # only "try again" is retried
    assert len(slept) == len(looked_up) - 1


def test_no_retry_starts_past_the_deadline(demo_server, monkeypatch):
    slept = sleeps(monkeypatch)
    cfg = FetchConfig(retries=5, backoff=10.0, deadline=5.0, allow_networks=LOOPBACK)
    got = fetch_url(demo_server.url("/status/503"), cfg)
    assert isinstance(got, Reject) and got.reason == "http_503"
    assert "no retry: it would pass the deadline" in got.detail
    assert slept == [] and demo_server.requests["/status/503"] == 1


def test_credentials_in_the_url_are_not_sent(demo_server, demo_root):
    url = demo_server.url("/img/b.png").replace("http://", "http://user:secret@")
    assert fetch_url(url, FAST) == body_of(demo_root, "b.png")
    assert "Authorization" not in demo_server.last_headers["/img/b.png"]


@pytest.mark.parametrize("decode", [False, True])
def test_fetch_in_worker_processes_equals_fetch_in_threads(demo_server, decode):
    """processes > 1 (fetch and decode in forked worker processes, batches kept in flight)
    gives the same records and rejects as fetching in the worker's own threads."""
    import dataclasses

    from pipelines.stages.images import ImageConfig

    records = [
        record("k1", demo_server.url("/img/a.jpg")),
        record("k2", demo_server.url("/img/b.png")),
        record("k3", demo_server.url("/img/gone.jpg")),
        record("k4", demo_server.url("/html")),
        record("k5", demo_server.url("/img/c.jpg")),
        record("k6", None),
        record("k7", demo_server.url("/redirect/img/c.jpg")),
    ]
    cfg = ImageConfig(image_size=64) if decode else None

    def rows(pcoll, label):
        return (pcoll | label >> beam.Map(lambda r: repr(sorted(
            (k, v) for k, v in r.items() if k != "detail")))
            | f"{label}List" >> beam.combiners.ToList()
            | f"{label}Sorted" >> beam.Map(sorted))

    with TestPipeline() as p:
        src = p | beam.Create(records)
        threads = src | "Threads" >> Fetch(FAST, in_flight=2, decode=cfg)
        procs = src | "Procs" >> Fetch(dataclasses.replace(FAST, processes=2), in_flight=2,
                                       decode=cfg)
        want = rows(threads.records, "WantOk")
        got = rows(procs.records, "GotOk")
        want_rej = rows(threads[REJECTS], "WantRej")
        got_rej = rows(procs[REJECTS], "GotRej")

        def same(pair):
            a, b = pair
            assert a == b, (a, b)

        _ = ((want, got) | "OkPair" >> beam.Flatten() | "OkAll" >> beam.combiners.ToList()
             | "OkSame" >> beam.Map(same))
        _ = ((want_rej, got_rej) | "RejPair" >> beam.Flatten()
             | "RejAll" >> beam.combiners.ToList() | "RejSame" >> beam.Map(same))


@pytest.mark.parametrize("argv, runner, want", [
    ([], "FnApiRunner", 4),  # no --runner: DirectRunner, whose batch runner is the FnApiRunner
    (["--runner=DirectRunner"], "FnApiRunner", 4),
    (["--runner=FnApiRunner"], "FnApiRunner", 4),
    (["--runner=DirectRunner", "--direct_running_mode=multi_processing",
      "--direct_num_workers=2"], "FnApiRunner", 1),
    (["--runner=DirectRunner", "--direct_num_workers=2"], "FnApiRunner", 1),
    (["--runner=DirectRunner", "--environment_type=EXTERNAL",
      "--environment_config=localhost:50000"], "FnApiRunner", 1),
    (["--runner=BundleBasedDirectRunner"], "BundleBasedDirectRunner", 1),
    (["--runner=PrismRunner"], "PrismRunner", 1),
    (["--runner=DataflowRunner"], "DataflowRunner", 1),
    (["--runner=FlinkRunner"], "FlinkRunner", 1),
])
def test_fetch_processes_auto_is_the_cores_on_the_local_in_memory_runner_only(
        monkeypatch, argv, runner, want):
    """``DirectRunner`` names Beam's FnApiRunner (no Prism download, no silent switch of
    runner); ``--fetch_processes auto`` is the usable cores on its one in-memory worker, 1
    wherever the runner's workers are the processes; a count is kept as given."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines import image_guard
    from pipelines.recipes import kit

    monkeypatch.setattr(image_guard, "core_count", lambda: 4)
    opts = PipelineOptions(argv)
    assert kit.runner_of(opts) == runner
    n, why = kit.fetch_processes("auto", opts)
    assert (n, why.split(":")[0]) == (want, "auto")
    assert kit.fetch_processes(3, opts) == (3, "as given")


def test_fetch_processes_flag_takes_auto_or_a_positive_count():
    import argparse

    from pipelines.recipes import kit

    ap = argparse.ArgumentParser()
    kit.add_shared_flags(ap, "out/x")
    assert ap.parse_args([]).fetch_processes == "auto"
    assert ap.parse_args(["--fetch_processes", "AUTO"]).fetch_processes == "auto"
    assert ap.parse_args(["--fetch_processes", "3"]).fetch_processes == 3
    for bad in ("0", "-1", "two"):
        with pytest.raises(SystemExit):
            ap.parse_args(["--fetch_processes", bad])


def test_fetch_processes_share_the_machines_decode_slots(monkeypatch):
    """With P fetch processes, each decodes at most cores // P pictures at once (at least
    one), so the bound on pictures in decoding is the machine's, as with one process; a
    decode_slots given explicitly is kept."""
    import dataclasses

    from pipelines import image_guard
    from pipelines.stages import fetch as fetch_mod
    from pipelines.stages import images

    monkeypatch.setattr(image_guard, "core_count", lambda: 8)
    assert fetch_mod._decode_share(None, 2) is None
    for processes, given, want in [(1, None, 8), (2, None, 4), (3, None, 2), (16, None, 1),
                                   (2, 5, 5)]:
        cfg = images.ImageConfig(image_size=64, decode_slots=given)
        got = fetch_mod._decode_share(cfg, processes)
        assert got.decode_slots == want
        assert dataclasses.replace(got, decode_slots=given) == cfg


@pytest.mark.parametrize("processes", [1, 2])
def test_a_slow_fetch_holds_one_slot_not_the_records_beside_it(demo_server, processes):
    """Streaming: with 4 fetches in flight, one URL answering in 2 s does not hold back the
    other records; they leave while it is still running (a fetch in batches would wait for
    the slowest of each batch), and the slow one leaves from finish_bundle."""
    import dataclasses

    cfg = dataclasses.replace(FAST, processes=processes, deadline=10.0)
    fn = FetchDoFn(cfg, in_flight=4)
    fn.setup()
    try:
        records = [record("slow", demo_server.url("/slow/2/img/a.jpg"))] + [
            record(f"k{i}", demo_server.url("/img/b.png")) for i in range(12)]
        start = time.monotonic()
        early = list(fn.process(records))
        took = time.monotonic() - start
        late = list(fn.finish_bundle())
        total = time.monotonic() - start
    finally:
        fn.teardown()
    early_keys = [o.value["key"] for o in early]
    late_keys = [o.value["key"] for o in late]
    assert sorted(early_keys + late_keys) == sorted(r["key"] for r in records)
    # the 12 fast ones went through 3 slots while the slow one held the 4th: all but the
    # last few (still in flight when process returned) left before it ended
    assert "slow" not in early_keys and len(early_keys) >= 12 - 3 and took < 1.5, \
        (early_keys, took)
    assert late_keys[-1] == "slow" and total >= 2.0


def test_a_fetch_process_that_dies_fails_its_fetches_with_its_exit_code(demo_server,
                                                                        demo_root):
    """A fetch process killed (or crashed in native code) while holding fetches: each gives
    an error naming its exit code (FetchDoFn raises it, failing the bundle: no record is
    silently lost), and the other process takes the next URLs."""
    import dataclasses
    import signal

    from pipelines.stages.fetch import FetchProcesses

    procs = FetchProcesses(dataclasses.replace(FAST, processes=2, deadline=10.0))
    try:
        slow = demo_server.url("/slow/3/img/a.jpg")
        procs.submit([(1, slow), (2, slow)])  # one each: the least loaded process first
        time.sleep(0.3)
        os.kill(procs._procs[0].pid, signal.SIGKILL)
        token, ok, error = procs.results.get(timeout=10)
        assert (token, ok) == (1, False)
        assert re.search(r"fetch-0 \(pid \d+\) exited with code -9 holding 1 fetch", str(error))
        procs.submit([(3, demo_server.url("/img/b.png"))])  # to the live one
        got = {t: (o, v) for t, o, v in (procs.results.get(timeout=10) for _ in range(2))}
        assert got[2] == (True, body_of(demo_root, "a.jpg"))
        assert got[3] == (True, body_of(demo_root, "b.png"))
    finally:
        procs.close()
