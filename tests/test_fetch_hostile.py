"""Hostile web rows against the fetch stage (issue 16): stored credentials on redirects, drip-fed
responses, local files / FIFOs / bucket URLs, and the address guard (SSRF).

Everything runs against real loopback servers (the DemoServer) and files made here; nothing
needs the network. Timing assertions are deliberately loose: a hostile server drips for 60 s
and a test only checks that the fetch came back well before that (joins of 10-15 s).
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import pytest

from pipelines.demo.server import DemoServer
from pipelines.records import Reject
from pipelines.stages.fetch import FetchConfig, Fetcher, address_refusal, fetch_url

LOOPBACK = ("127.0.0.0/8",)
# The demo server is on loopback: exempt it; timeout is the per-read socket timeout.
DRIP = FetchConfig(timeout=1.0, deadline=1.5, retries=2, backoff=0.01, allow_networks=LOOPBACK)


def body_of(demo_root, name):
    return (demo_root / "img" / name).read_bytes()


def in_thread(fn: Callable[[], Any], join: float = 15.0) -> Any:
    """``fn()`` in a daemon thread; fails if it has not returned within ``join`` seconds."""
    out: dict[str, Any] = {}
    t = threading.Thread(target=lambda: out.update(r=fn()), daemon=True)
    t.start()
    t.join(join)
    assert not t.is_alive(), f"still running after {join}s"
    return out["r"]


def eventually(check: Callable[[], bool], within: float = 10.0) -> bool:
    stop = time.monotonic() + within
    while time.monotonic() < stop:
        if check():
            return True
        time.sleep(0.05)
    return check()


def redirect_to(server: DemoServer, target: str) -> str:
    return server.url("/redirect-to?url=" + urllib.parse.quote(target, safe=""))


@pytest.fixture
def no_sockets(monkeypatch):
    """A list that records every socket created while the test runs. Such a socket connects
    to loopback only: should the guard fail, the test does not reach a real private address
    (some sandboxes answer at 10.0.0.1 or 169.254.169.254)."""
    created: list[tuple[Any, ...]] = []
    real = socket.socket

    class Recording(real):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if "fileno" not in kwargs:  # not a server's accept(): a new outgoing socket
                created.append(args)
            super().__init__(*args, **kwargs)

        def connect(self, address: Any) -> None:
            if not str(address[0]).startswith(("127.", "::1", "::ffff:127.")):
                raise OSError(errno.ENETUNREACH, f"test: no connection to {address[0]}")
            super().connect(address)

    monkeypatch.setattr(socket, "socket", Recording)
    return created


# --- 1. stored credentials are never sent, not even after a redirect -------------------------


def test_netrc_credentials_never_sent_after_redirect(demo_root, tmp_path, monkeypatch):
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine localhost login user password secret\n"
                     "default login anyone password secret2\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = FetchConfig(retries=0, timeout=5.0, allow_networks=LOOPBACK)
    with DemoServer(demo_root) as first, DemoServer(demo_root) as named, \
            DemoServer(demo_root, host="127.0.0.2") as other:
        # a host named in .netrc, and one that only the `default` entry covers
        for server, target in ((named, f"http://localhost:{named.port}/img/a.jpg"),
                               (other, other.url("/img/a.jpg"))):
            got = fetch_url(redirect_to(first, target), cfg)
            assert got == body_of(demo_root, "a.jpg")
            assert server.requests["/img/a.jpg"] == 1  # the redirect was followed
            received = {k.lower() for k in server.last_headers["/img/a.jpg"]}
            assert "authorization" not in received and "proxy-authorization" not in received
        assert "Authorization" not in first.last_headers["/redirect-to"]


def test_environment_proxies_are_not_used(demo_server, demo_root, monkeypatch):
    with DemoServer(demo_root) as proxy:
        for var in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY",
                    "all_proxy"):
            monkeypatch.setenv(var, proxy.base_url)
        for var in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(var, raising=False)
        got = fetch_url(demo_server.url("/img/a.jpg"), FetchConfig(allow_networks=LOOPBACK))
        assert got == body_of(demo_root, "a.jpg")
        assert demo_server.requests["/img/a.jpg"] == 1
        assert sum(proxy.requests.values()) == 0  # nothing went through the "proxy"


# --- 2. one deadline per fetch, enforced by the client -----------------------------------------


def test_header_drip_ends_at_the_deadline(demo_server):
    # one header byte every 0.3 s, for 60 s: each read is well within timeout=1
    path = "/drip-headers/0.3"
    got = in_thread(lambda: fetch_url(demo_server.url(path), DRIP))
    assert isinstance(got, Reject) and got.reason == "timeout"
    assert "deadline 1.5s passed while reading headers after 1 attempt" in got.detail
    assert demo_server.requests[path] == 1  # no retry starts past the deadline
    assert eventually(lambda: demo_server.client_gone[path] == 1)  # the server saw it hang up


def test_body_drip_ends_at_the_deadline(demo_server):
    path = "/drip-body/0.2/img/a.jpg"
    got = in_thread(lambda: fetch_url(demo_server.url(path), DRIP))
    assert isinstance(got, Reject) and got.reason == "timeout"
    assert "deadline 1.5s passed while reading the body" in got.detail
    assert demo_server.requests[path] == 1
    assert eventually(lambda: demo_server.client_gone[path] == 1)


def test_close_returns_while_a_drip_is_in_flight(demo_server, demo_root):
    fetcher = Fetcher(DRIP)
    urls = [demo_server.url("/drip-headers/0.3"), demo_server.url("/img/a.jpg")]
    results: dict[str, Any] = {}
    t = threading.Thread(target=lambda: results.update(r=fetcher.fetch_many(urls)), daemon=True)
    t.start()
    assert eventually(lambda: demo_server.requests["/drip-headers/0.3"] == 1)
    in_thread(fetcher.close)  # waits for the drip: only the deadline ends it in time
    t.join(5)
    assert not t.is_alive()
    drip, image = results["r"]
    assert isinstance(drip, Reject) and drip.reason == "timeout"
    assert image == body_of(demo_root, "a.jpg")


def test_tls_handshake_drip_ends_at_the_deadline():
    """A TLS server that answers the ClientHello one byte every 0.3 s (no certificate needed:
    the handshake never gets that far)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(20)
    stop, hung_up = threading.Event(), threading.Event()

    def drip() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.recv(4096)  # the ClientHello
            try:  # a handshake record header announcing 16 KB, then its bytes, slowly
                for byte in b"\x16\x03\x03\x40\x00" + b"\x02" * 200:
                    if stop.wait(0.3):
                        return
                    conn.sendall(bytes([byte]))
            except OSError:
                hung_up.set()

    threading.Thread(target=drip, daemon=True).start()
    try:
        url = f"https://127.0.0.1:{listener.getsockname()[1]}/a.jpg"
        # a socket timeout far beyond the join: only the deadline ends it in time
        cfg = FetchConfig(timeout=30.0, deadline=1.5, retries=0, allow_networks=LOOPBACK)
        got = in_thread(lambda: fetch_url(url, cfg))
        assert isinstance(got, Reject) and got.reason == "timeout"
        assert "deadline 1.5s passed while doing the TLS handshake" in got.detail
        assert hung_up.wait(10)
    finally:
        stop.set()
        listener.close()


def test_slow_name_resolution_ends_at_the_deadline(monkeypatch):
    release = threading.Event()
    real = socket.getaddrinfo

    def hanging(host, *args, **kwargs):
        if host == "slow-dns.example":
            release.wait(60)  # a resolver that does not answer
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", hanging)
    try:
        got = in_thread(lambda: fetch_url("http://slow-dns.example/a.jpg", DRIP))
    finally:
        release.set()
    assert isinstance(got, Reject) and got.reason == "timeout"
    assert "resolving the host name" in got.detail


# --- 4. local files, FIFOs and bucket URLs -------------------------------------------------------


@pytest.fixture
def png(demo_root):
    return demo_root / "img" / "b.png"


def test_local_paths_and_bucket_urls_are_not_fetched_by_default(png, no_sockets):
    for url in ["/proc/self/environ", str(png), png.as_uri(), "file:///etc/passwd",
                "gs://bucket/x.jpg", "s3://bucket/x.jpg"]:
        got = fetch_url(url, FetchConfig())
        assert isinstance(got, Reject), url
        assert got.reason == "unsupported_scheme", (url, got)
        assert "--allow_path_prefixes" in got.detail
    assert no_sockets == []  # not even a bucket client was started


def test_allowed_prefix_reads_only_regular_files_inside(tmp_path, png):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "in.png").write_bytes(png.read_bytes())
    (tmp_path / "outside.png").write_bytes(b"secret")
    (allowed / "link.png").symlink_to(tmp_path / "outside.png")
    (allowed / "sub").mkdir()
    cfg = FetchConfig(allowed_prefixes=(str(allowed),))

    assert fetch_url(str(allowed / "in.png"), cfg) == png.read_bytes()
    assert fetch_url((allowed / "in.png").as_uri(), cfg) == png.read_bytes()
    for url in [str(allowed / ".." / "outside.png"), f"{allowed}/../outside.png",
                str(allowed / "link.png"), (allowed / "link.png").as_uri(), str(png),
                "/proc/self/environ"]:
        got = fetch_url(url, cfg)
        assert isinstance(got, Reject) and got.reason == "path_not_allowed", (url, got)
    got = fetch_url(str(allowed / "sub"), cfg)
    assert isinstance(got, Reject) and got.reason == "not_a_regular_file"
    assert "directory" in got.detail
    got = fetch_url("gs://bucket/x.jpg", cfg)  # a local prefix does not allow buckets
    assert isinstance(got, Reject) and got.reason == "unsupported_scheme"


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    cfg = FetchConfig(allowed_prefixes=(str(tmp_path),))
    try:
        got = in_thread(lambda: fetch_url(str(fifo), cfg), join=10)
    finally:  # let a reader blocked in open() (the old behaviour) go
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError as e:
            assert e.errno == errno.ENXIO  # nobody has it open: nothing was blocked
    assert isinstance(got, Reject) and got.reason == "not_a_regular_file"
    assert "FIFO" in got.detail


def test_bucket_prefixes_are_checked_after_normalising(no_sockets):
    cfg = FetchConfig(allowed_prefixes=("gs://bucket/allowed",))
    for url in ["gs://bucket/allowed/../secret/x.jpg", "gs://bucket/allowed-not/x.jpg",
                "gs://bucket/allowed/./../../other/x.jpg", "gs://other/allowed/x.jpg"]:
        got = fetch_url(url, cfg)
        assert isinstance(got, Reject) and got.reason == "path_not_allowed", (url, got)
    for url in ["s3://bucket/allowed/x.jpg", "/etc/passwd"]:  # a gs prefix allows gs only
        got = fetch_url(url, cfg)
        assert isinstance(got, Reject) and got.reason == "unsupported_scheme", (url, got)
    assert no_sockets == []


# --- 5. the address guard (SSRF) ----------------------------------------------------------------


def test_loopback_is_refused_by_default_and_allowed_on_request(demo_server, demo_root):
    url = demo_server.url("/img/a.jpg")
    got = fetch_url(url, FetchConfig(retries=0))
    assert isinstance(got, Reject) and got.reason == "address_refused"
    assert got.detail == "127.0.0.1 is loopback"
    assert demo_server.requests["/img/a.jpg"] == 0
    assert fetch_url(url, FetchConfig(allow_networks=LOOPBACK)) == body_of(demo_root, "a.jpg")
    assert fetch_url(url, FetchConfig(address_guard=False)) == body_of(demo_root, "a.jpg")


def test_metadata_endpoint_is_refused_without_connecting(no_sockets):
    got = fetch_url("http://169.254.169.254/latest/meta-data/", FetchConfig(timeout=1,
                                                                            retries=0))
    assert isinstance(got, Reject) and got.reason == "address_refused"
    assert got.detail == "169.254.169.254 is link-local (cloud metadata)"
    assert no_sockets == []


@pytest.mark.parametrize(
    "host, why",
    [
        ("10.0.0.1", "10.0.0.1 is private"),
        ("[::1]", "::1 is loopback"),
        ("[::ffff:127.0.0.1]", "(IPv4 127.0.0.1) is loopback"),
        ("0.0.0.0", "0.0.0.0 is unspecified"),
        ("127.1", "127.1: 127.0.0.1 is loopback"),  # short and decimal forms resolve too
        ("2130706433", "2130706433: 127.0.0.1 is loopback"),
        ("localhost", "localhost: 127.0.0.1 is loopback"),
    ],
)
def test_non_global_addresses_are_refused(demo_server, host, why, no_sockets):
    got = fetch_url(f"http://{host}:{demo_server.port}/img/a.jpg",
                    FetchConfig(timeout=1, retries=0))
    assert isinstance(got, Reject) and got.reason == "address_refused", got
    assert why in got.detail
    assert no_sockets == []  # refused before any connection attempt
    assert sum(demo_server.requests.values()) == 0


def test_public_looking_name_resolving_to_loopback_is_refused(demo_server, demo_root,
                                                              monkeypatch):
    real = socket.getaddrinfo

    def rebinding(host, port, *args, **kwargs):
        if host == "evil.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    url = f"http://evil.example:{demo_server.port}/img/a.jpg"
    got = fetch_url(url, FetchConfig(retries=0))
    assert isinstance(got, Reject) and got.reason == "address_refused"
    assert got.detail == "evil.example: 127.0.0.1 is loopback"
    assert demo_server.requests["/img/a.jpg"] == 0
    # allowed on request; the Host header keeps the name
    assert fetch_url(url, FetchConfig(allow_networks=LOOPBACK)) == body_of(demo_root, "a.jpg")
    assert demo_server.last_headers["/img/a.jpg"]["Host"] == f"evil.example:{demo_server.port}"


@pytest.mark.parametrize(
    "target, why",
    [
        ("http://10.0.0.1/x", "10.0.0.1 is private"),
        ("http://169.254.169.254/latest/meta-data/",
         "169.254.169.254 is link-local (cloud metadata)"),
        ("http://[fd00:ec2::254]/latest/meta-data/", "fd00:ec2::254 is private (cloud metadata)"),
        ("http://100.100.100.200/",
         "100.100.100.200 is shared address space (CGNAT 100.64.0.0/10) (cloud metadata)"),
    ],
)
def test_redirect_to_a_private_address_is_refused(demo_server, target, why, no_sockets):
    # the first hop (loopback) is allowed; the hop it redirects to is checked on its own
    got = fetch_url(redirect_to(demo_server, target),
                    FetchConfig(timeout=1, retries=0, allow_networks=LOOPBACK))
    assert isinstance(got, Reject) and got.reason == "address_refused", got
    assert got.detail == why
    assert demo_server.requests["/redirect-to"] == 1
    assert len(no_sockets) == 1  # the connection to the demo server, and no other


def test_redirect_to_a_file_url_is_refused(demo_server, tmp_path):
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"secret")
    cfg = FetchConfig(retries=0, allow_networks=LOOPBACK, allowed_prefixes=(str(tmp_path),))
    got = fetch_url(redirect_to(demo_server, secret.as_uri()), cfg)
    assert isinstance(got, Reject) and got.reason == "unsupported_scheme"
    assert "redirect to a file: URL refused" in got.detail


@pytest.mark.parametrize(
    "address, why",
    [
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
        ("192.168.1.1", "192.168.1.1 is private"),
        ("172.16.0.1", "172.16.0.1 is private"),
        ("100.64.0.1", "100.64.0.1 is shared address space (CGNAT 100.64.0.0/10)"),
        ("169.254.1.1", "169.254.1.1 is link-local"),
        ("fe80::1", "fe80::1 is link-local"),
        ("fd12:3456::1", "fd12:3456::1 is private"),
        ("224.0.0.1", "224.0.0.1 is multicast"),
        ("ff02::1", "ff02::1 is multicast"),
        ("240.0.0.1", "240.0.0.1 is reserved"),
        ("::", ":: is unspecified"),
        ("2002:7f00:1::", "2002:7f00:1:: (IPv4 127.0.0.1) is loopback"),  # 6to4
        ("64:ff9b::a00:1", "64:ff9b::a00:1 (IPv4 10.0.0.1) is private"),  # NAT64
        ("168.63.129.16", "168.63.129.16 is a cloud host endpoint (cloud metadata)"),
    ],
)
def test_address_refusal(address, why):
    import ipaddress

    assert address_refusal(ipaddress.ip_address(address)) == why


def test_allow_networks_exempts_only_what_it_lists():
    import ipaddress

    allow = (ipaddress.ip_network("10.1.0.0/16"),)
    assert address_refusal(ipaddress.ip_address("10.1.2.3"), allow) is None
    assert address_refusal(ipaddress.ip_address("10.2.0.1"), allow) == "10.2.0.1 is private"
    with pytest.raises(ValueError, match="not a network"):
        FetchConfig(allow_networks=("10.0.0.0/33",))
