"""Check a Beam SDK worker pool (``--environment_type=EXTERNAL``) before a job is run on it.

A worker pool (``python -m apache_beam.runners.worker.worker_pool_main``, or Beam's SDK
container started with ``--worker_pool``) starts each worker as ``python -c ...SdkHarness...``
with the ``python`` on *its* PATH. When that ``python`` cannot import Beam (or our package),
the worker dies at once, the pool still answers ``StartWorker`` with success, and Beam's
in-process job service (``--runner=PortableRunner --job_endpoint=embed``, or the DirectRunner
with an EXTERNAL environment) waits for the worker's control connection with no timeout: the
launcher hangs forever, with nothing in its log.

:func:`probe_worker_pool` asks the pool for one worker of its own, pointed at a throwaway
control server, and waits a bounded time for that worker to connect: a pool whose workers
cannot start becomes a clear error within ``timeout`` seconds instead of a hang.
:func:`check_external_environment` runs the probe when the pipeline options say the job's
workers come from a pool this process will talk to (an EXTERNAL environment on a job this
process runs itself); a job submitted to a remote job server (Flink, Spark) is left alone: its
pool may be reachable only from the cluster (a sidecar at ``localhost:50000``).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from concurrent import futures

log = logging.getLogger(__name__)

#: seconds a probe worker has to start (import Beam, connect); a healthy one takes ~2-5 s
DEFAULT_TIMEOUT = 60.0


class WorkerPoolError(RuntimeError):
    """The worker pool did not start a worker that reached us."""


def _worker_host(pool_address: str) -> str:
    """The host name a pool's worker dials to reach this process: ``localhost`` for a pool on
    this machine, else this machine's name (``socket.getfqdn()``, as Beam's
    ``ExternalWorkerHandler`` gives its workers)."""
    host = pool_address.rsplit(":", 1)[0].strip("[]")
    if host in ("localhost", "127.0.0.1", "::1", ""):
        return "localhost"
    return socket.getfqdn()


def probe_worker_pool(address: str, timeout: float = DEFAULT_TIMEOUT) -> float:
    """Have the pool at ``address`` (``host:port``) start one worker and wait up to ``timeout``
    seconds for it to connect. Returns the seconds it took; raises :class:`WorkerPoolError`
    when the pool is unreachable, refuses, or its worker never connects."""
    import grpc
    from apache_beam.portability.api import (
        beam_fn_api_pb2,
        beam_fn_api_pb2_grpc,
        endpoints_pb2,
    )

    connected = threading.Event()
    worker_id = f"rs-corpus-probe-{uuid.uuid4().hex[:8]}"

    class _Control(beam_fn_api_pb2_grpc.BeamFnControlServicer):
        def Control(self, request_iterator, context):  # gRPC names the method
            if dict(context.invocation_metadata()).get("worker_id") == worker_id:
                connected.set()
            return iter(())  # no work: the worker's control stream ends and it exits

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    beam_fn_api_pb2_grpc.add_BeamFnControlServicer_to_server(_Control(), server)
    port = server.add_insecure_port("[::]:0")
    server.start()
    endpoint = endpoints_pb2.ApiServiceDescriptor(url=f"{_worker_host(address)}:{port}")
    start = time.monotonic()
    channel = grpc.insecure_channel(address)
    stub = beam_fn_api_pb2_grpc.BeamFnExternalWorkerPoolStub(channel)
    try:
        try:
            response = stub.StartWorker(
                beam_fn_api_pb2.StartWorkerRequest(
                    worker_id=worker_id, control_endpoint=endpoint,
                    artifact_endpoint=endpoint, provision_endpoint=endpoint,
                    logging_endpoint=endpoint),
                timeout=timeout)
        except grpc.RpcError as e:
            raise WorkerPoolError(
                f"no Beam worker pool answers at {address} ({e.code().name}: {e.details()}); "
                "start one with `python -m apache_beam.runners.worker.worker_pool_main "
                "--service_port=PORT` (or Beam's SDK image with --worker_pool)") from e
        if response.error:
            raise WorkerPoolError(f"the worker pool at {address} could not start a worker:\n"
                                  f"{response.error}")
        if not connected.wait(max(0.0, timeout - (time.monotonic() - start))):
            raise WorkerPoolError(
                f"the worker pool at {address} started a worker that did not connect within "
                f"{timeout:g} s. The pool runs each worker with the `python` on its own PATH: "
                "that python must import apache_beam (the launcher's version) and rs-corpus; "
                "see the pool's stderr for the worker's error (in our image: `docker logs`)")
        took = time.monotonic() - start
        log.info("worker pool at %s: a worker connected in %.1f s", address, took)
        return took
    finally:
        try:
            stub.StopWorker(beam_fn_api_pb2.StopWorkerRequest(worker_id=worker_id), timeout=10)
        except grpc.RpcError:
            pass
        channel.close()
        server.stop(0)


def external_pool_address(options) -> str | None:
    """The pool address to probe for ``options`` (Beam ``PipelineOptions``), or None when the
    job's workers are not an EXTERNAL pool that this process's job service talks to."""
    from apache_beam.options.pipeline_options import PortableOptions, StandardOptions

    portable = options.view_as(PortableOptions)
    if (portable.environment_type or "").upper() != "EXTERNAL":
        return None
    runner = options.view_as(StandardOptions).runner or "DirectRunner"
    name = runner if isinstance(runner, str) else type(runner).__name__
    local_job = name in ("DirectRunner", "FnApiRunner", "BundleBasedDirectRunner") or (
        name == "PortableRunner" and (portable.job_endpoint or "embed") == "embed")
    if not local_job:
        return None
    config = portable.environment_config or ""
    if config.startswith("{"):  # the JSON form: {"url": "host:port", "params": {...}}
        import json

        config = json.loads(config).get("url", "")
    return config or None


def check_external_environment(options, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Probe the EXTERNAL worker pool named by ``options`` (see :func:`external_pool_address`);
    a no-op for any other environment or a remote job server; ``timeout <= 0`` skips it."""
    address = external_pool_address(options)
    if address and timeout > 0:
        probe_worker_pool(address, timeout)
