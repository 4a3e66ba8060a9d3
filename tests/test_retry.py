"""A bundle that fails once is retried, and the build's output is still exact.

On a cluster a worker dies mid-bundle (preempted VM, OOM, a lost TaskManager) and the runner
runs the bundle again: Dataflow retries a failed bundle up to 4 times in batch, Flink restarts
from its last checkpoint (a batch job: the failed region). Everything a failed attempt emitted is
discarded, but what it wrote to files stays. So our stages must be idempotent and the sink must
survive a rerun: every file is written under a temporary name unique per attempt
(``{name}.incomplete-{uuid}``) and renamed over any earlier copy.

What Beam does here (2.7x, found by these tests): the ``DirectRunner`` (the FnApiRunner) does
**not** retry: one failure fails the build. The ``BundleBasedDirectRunner`` retries a failed
bundle up to 4 times (``apache_beam.runners.direct.executor.TransformExecutor``), like Dataflow,
so it is the runner the retry tests use; the ``PortableRunner``'s in-process job service runs the
FnApiRunner and does not retry either.

The failure is injected into our own DoFns, in this process: the first attempt of every bundle
runs to the end of the bundle (records fetched, files written and renamed, outputs emitted) and
then raises in ``finish_bundle``; a marker file per bundle makes the retry pass.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from pathlib import Path

import pytest
from local_builds import assert_same_build, build, make_world

pytestmark = pytest.mark.slow


class InjectedFailure(RuntimeError):
    """The failure a test injects (a worker that died mid-bundle)."""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The smallest demo world the ``local`` recipe builds (as in test_worker_pool.py)."""
    return make_world(tmp_path_factory.mktemp("retry_world"), seed=6)


@pytest.fixture(scope="module")
def direct(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("direct")
    return out, build(world, out)


def _ident(element) -> str:
    """A stable name of an element: its record key(s), or a sink group's bucket."""
    if isinstance(element, dict):
        return str(element.get("key"))
    if isinstance(element, list):
        return ",".join(sorted(_ident(e) for e in element))
    if isinstance(element, tuple):
        return str(element[0])  # (bucket, rows): a shard or table group
    return repr(element)


@contextlib.contextmanager
def fail_once_per_bundle(cls, marker_dir: Path):
    """Make DoFn class ``cls`` raise at the end of the first attempt of every bundle (after
    processing all of it); the bundle is named by its elements, the attempt by a marker file."""
    orig = {name: cls.__dict__.get(name) for name in ("start_bundle", "process",
                                                      "finish_bundle")}
    base_start, base_process, base_finish = cls.start_bundle, cls.process, cls.finish_bundle

    def start_bundle(self, *args, **kwargs):
        self._injected_seen = []
        return base_start(self, *args, **kwargs)

    @functools.wraps(base_process)
    def process(self, element, *args, **kwargs):
        self.__dict__.setdefault("_injected_seen", []).append(_ident(element))
        return base_process(self, element, *args, **kwargs)

    def finish_bundle(self, *args, **kwargs):
        out = base_finish(self, *args, **kwargs)
        seen = sorted(self.__dict__.get("_injected_seen", []))
        if seen:
            digest = hashlib.sha256("\n".join(seen).encode()).hexdigest()[:16]
            marker = marker_dir / f"{cls.__name__}-{digest}"
            if not marker.exists():
                marker.write_text("\n".join(seen))
                raise InjectedFailure(f"{cls.__name__}: injected failure after a bundle of "
                                      f"{len(seen)} elements")
        return out

    cls.start_bundle, cls.process, cls.finish_bundle = start_bundle, process, finish_bundle
    try:
        yield
    finally:
        for name, fn in orig.items():
            if fn is None:
                delattr(cls, name)
            else:
                setattr(cls, name, fn)


def _injected(marker_dir: Path, cls) -> int:
    return len(list(marker_dir.glob(f"{cls.__name__}-*")))


def test_each_bundle_failing_once_still_gives_the_exact_build(world, direct, tmp_path):
    """Fetch/decode (records emitted, then lost with the attempt) and the shard writer (files
    written and renamed, then the attempt lost) each fail once per bundle; the retried build
    equals the DirectRunner's byte for byte."""
    from pipelines.sinks.shards import _WriteShard, _WriteTable
    from pipelines.stages.fetch import FetchDoFn

    expected_dir, expected = direct
    markers = tmp_path / "markers"
    markers.mkdir()
    out = tmp_path / "retried"
    with fail_once_per_bundle(FetchDoFn, markers), \
            fail_once_per_bundle(_WriteShard, markers), \
            fail_once_per_bundle(_WriteTable, markers):
        stats = build(world, out, "--runner=BundleBasedDirectRunner")
    assert _injected(markers, FetchDoFn) >= 1
    assert _injected(markers, _WriteShard) >= 1
    assert _injected(markers, _WriteTable) >= 1
    assert stats == expected
    assert_same_build(expected_dir, out)


def test_the_direct_runner_does_not_retry(world, tmp_path):
    """The FnApiRunner gives up at the first failure: the retry tests need the
    BundleBasedDirectRunner (or a cluster)."""
    from pipelines.sinks.shards import _WriteShard

    markers = tmp_path / "markers"
    markers.mkdir()
    with fail_once_per_bundle(_WriteShard, markers), pytest.raises(Exception,
                                                                   match="injected failure"):
        build(world, tmp_path / "out")
    assert _injected(markers, _WriteShard) == 1


def test_a_crash_between_write_and_rename_leaves_only_an_unread_temporary(world, direct,
                                                                         tmp_path, monkeypatch):
    """A worker that dies after writing a file's temporary copy and before renaming it: the
    retry writes its own temporary (unique per attempt) and renames it; the output equals the
    DirectRunner's, and the dead attempt's ``*.incomplete-*`` file is removed when the subset
    completes."""
    from pipelines.sinks import shards

    expected_dir, expected = direct
    markers = tmp_path / "markers"
    markers.mkdir()
    real_rename = shards.FileSystems.rename

    def dying_rename(sources, destinations):
        marker = markers / Path(destinations[0]).name
        if destinations[0].endswith(".tar") and not marker.exists():
            marker.touch()
            raise InjectedFailure(f"worker died before renaming {sources[0]}")
        return real_rename(sources, destinations)

    monkeypatch.setattr(shards.FileSystems, "rename", dying_rename)
    out = tmp_path / "retried"
    stats = build(world, out, "--runner=BundleBasedDirectRunner")
    monkeypatch.undo()
    assert stats == expected
    assert len(list(markers.iterdir())) >= 1  # a worker did die before a rename ...
    assert not list(out.rglob("*.incomplete-*"))  # ... and the sink removed its temporary
    assert_same_build(expected_dir, out)
