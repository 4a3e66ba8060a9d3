"""The worker side of a cluster, here: Beam's Python SDK worker pool in its own process.

On Flink (compose or Kubernetes) our code runs in workers that a worker pool
(``apache_beam.runners.worker.worker_pool_main``, ``--environment_type=EXTERNAL``) starts as
separate ``python`` processes: they share nothing with the launcher but the files they read. The
test starts such a pool (its own process group and environment; PATH's ``python`` is this
virtualenv's, as it would be the image's), runs the ``local`` recipe through ``PortableRunner``
with Beam's in-process job service (``--job_endpoint=embed``: Flink's job server is a download
we cannot make) and the EXTERNAL environment, and compares every output file with a
DirectRunner build of the same input, byte for byte. The tiny CLIP loads inside the workers
from its path.

A pool whose ``python`` cannot import Beam starts workers that die at once, and Beam's job
service then waits for them forever; :mod:`pipelines.worker_pool` turns that into an error
within a bounded time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from local_builds import assert_same_build, build, make_world

from pipelines.worker_pool import WorkerPoolError, check_external_environment, probe_worker_pool

pytestmark = pytest.mark.slow

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the worker pool exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("localhost", port), 1):
            return
        time.sleep(0.2)
    raise TimeoutError(f"the worker pool did not listen on {port} within {timeout} s")


@contextlib.contextmanager
def worker_pool(log_path: Path, path_first: str | None = None):
    """A worker pool in its own process group; yields its ``localhost:PORT``. Its workers run
    the ``python`` first on PATH: this virtualenv's, or the one in ``path_first``."""
    port = _free_port()
    venv_bin = os.path.dirname(sys.executable)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = os.pathsep.join(
        [*([path_first] if path_first else []), venv_bin, os.environ.get("PATH", "")])
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main",
             f"--service_port={port}"],
            env=env, cwd=str(log_path.parent), stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            _wait_for_port(port, proc, timeout=60)
            yield f"localhost:{port}"
        finally:
            # the pool and the workers it started share its process group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The smallest demo world the ``local`` recipe builds: a captioned folder with its
    planted bad rows (rejects) and the tiny CLIP (embeddings)."""
    return make_world(tmp_path_factory.mktemp("pool_world"), seed=5)


def test_external_worker_pool_build_is_byte_identical_to_direct_runner(world, tmp_path):
    direct = tmp_path / "direct"
    expected = build(world, direct)
    assert expected["kept"] > 0 and expected["rejected"] > 0
    with worker_pool(tmp_path / "pool.log") as address:
        assert probe_worker_pool(address, timeout=60) < 60
        external = tmp_path / "external"
        stats = build(world, external, "--runner=PortableRunner", "--job_endpoint=embed",
                      "--environment_type=EXTERNAL", f"--environment_config={address}")
    log = (tmp_path / "pool.log").read_text(errors="replace")
    assert "Starting worker with command" in log  # the work ran in the pool's workers
    assert stats == expected
    assert json.loads((external / "manifest.json").read_text())["runner"] == "PortableRunner"
    assert_same_build(direct, external)


@pytest.fixture
def python_without_beam(tmp_path):
    """A folder whose ``python`` is this interpreter without its site-packages: it cannot
    import Beam, like a worker image whose PATH finds the system python first."""
    shim = tmp_path / "nobeam"
    shim.mkdir()
    exe = shim / "python"
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" -I -S "$@"\n')
    exe.chmod(0o755)
    check = subprocess.run([str(exe), "-c", "import apache_beam"], capture_output=True,
                           timeout=60, check=False)
    assert check.returncode != 0
    return str(shim)


def test_a_pool_whose_workers_cannot_import_beam_is_a_clear_error_not_a_hang(
        tmp_path, python_without_beam):
    with worker_pool(tmp_path / "pool.log", path_first=python_without_beam) as address:
        start = time.monotonic()
        with pytest.raises(WorkerPoolError, match="did not connect within 10 s"):
            probe_worker_pool(address, timeout=10)
        assert time.monotonic() - start < 30
        # the same check, as the launcher makes it from the pipeline options
        from apache_beam.options.pipeline_options import PipelineOptions

        opts = PipelineOptions(["--runner=PortableRunner", "--job_endpoint=embed",
                                "--environment_type=EXTERNAL",
                                f"--environment_config={address}"])
        with pytest.raises(WorkerPoolError, match="python"):
            check_external_environment(opts, timeout=5)
    log = (tmp_path / "pool.log").read_text(errors="replace")
    assert "No module named 'apache_beam'" in log  # the worker's own error, in the pool's log


def test_no_pool_at_the_address_is_a_clear_error():
    with pytest.raises(WorkerPoolError, match="no Beam worker pool answers"):
        probe_worker_pool(f"localhost:{_free_port()}", timeout=10)


def test_the_probe_runs_only_for_a_pool_this_process_talks_to():
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.worker_pool import external_pool_address

    def address(*flags):
        return external_pool_address(PipelineOptions(list(flags)))

    ext = ["--environment_type=EXTERNAL", "--environment_config=localhost:50000"]
    assert address("--runner=PortableRunner", "--job_endpoint=embed", *ext) == "localhost:50000"
    assert address("--runner=DirectRunner", *ext) == "localhost:50000"
    assert address("--runner=PortableRunner", "--job_endpoint=embed",
                   "--environment_type=EXTERNAL",
                   '--environment_config={"url": "pool:50000"}') == "pool:50000"
    # Flink's job server starts the workers from the cluster: the pool is its sidecar
    assert address("--runner=PortableRunner", "--job_endpoint=flink:8099", *ext) is None
    assert address("--runner=FlinkRunner", "--flink_master=flink:8081", *ext) is None
    assert address("--runner=PortableRunner", "--job_endpoint=embed",
                   "--environment_type=LOOPBACK") is None
    assert address("--runner=DataflowRunner") is None


def test_the_launcher_fails_fast_on_a_broken_pool(world, tmp_path, python_without_beam):
    """``--worker_start_timeout``: the recipe's launcher probes the pool before it runs the
    job (kit.run calls :func:`check_external_environment`)."""
    with worker_pool(tmp_path / "pool.log", path_first=python_without_beam) as address:
        start = time.monotonic()
        with pytest.raises(WorkerPoolError):
            build(world, tmp_path / "out", "--runner=PortableRunner", "--job_endpoint=embed",
                  "--environment_type=EXTERNAL", f"--environment_config={address}",
                  "--worker_start_timeout=10")
        assert time.monotonic() - start < 60
