"""``python -m pipelines.demo``: build the demo world, or serve it around a command.

    python -m pipelines.demo build --out data/demo [--port 8707] [--seed 0] [--if-missing]
    python -m pipelines.demo serve --out data/demo [--port 8707] -- CMD ARGS...

``build`` writes the world (:func:`pipelines.demo.pub11.build_pub11`; its URLs point at
``http://127.0.0.1:<port>``) and the tiny models (``DIR/models``, when
:mod:`pipelines.demo.tiny_models` is available). ``--if-missing`` keeps a world whose
``world.json`` has the same seed, base URL, parameters and generator version.

``serve`` starts the demo HTTP server on ``DIR/www``, runs ``CMD`` (with
``RS_CORPUS_DEMO_BASE_URL`` set), stops the server and exits with ``CMD``'s exit code. Without
a command it serves until interrupted.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("pipelines.demo")

DEFAULT_PORT = 8707
BASE_URL_ENV = "RS_CORPUS_DEMO_BASE_URL"


def base_url_for(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def _read_world(out: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(out, "world.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def world_is_current(out: str, seed: int, base_url: str, params: dict[str, int]) -> bool:
    """Whether ``out`` holds a finished world built with these settings by this generator."""
    from pipelines.demo.pub11 import GENERATOR_VERSION

    world = _read_world(out)
    return bool(world) and (
        world.get("version") == GENERATOR_VERSION
        and world.get("seed") == seed
        and world.get("base_url") == base_url
        and world.get("params") == params
    )


# the names pipelines.demo.tiny_models writes (importing it would import torch)
TINY_CLIP_DIR = "tiny-clip"
RS_PROBE_FILE = "rs_probe.json"


def _models_present(models_dir: str) -> bool:
    clip = os.path.join(models_dir, TINY_CLIP_DIR)
    probe = os.path.join(models_dir, RS_PROBE_FILE)
    return os.path.isdir(clip) and bool(os.listdir(clip)) and os.path.isfile(probe)


def cmd_build(args: argparse.Namespace) -> int:
    from pipelines.demo.pub11 import build_pub11

    out = args.out
    base_url = base_url_for(args.port)
    params = {"n_rs": args.n_rs, "n_non_rs": args.n_non_rs, "n_probe": args.n_probe}
    fresh = args.if_missing and world_is_current(out, args.seed, base_url, params)
    if fresh:
        log.info("demo world in %s is current (seed %d, %s): kept", out, args.seed, base_url)
    else:
        os.makedirs(out, exist_ok=True)
        log.info("building the demo world in %s (seed %d, %s)", out, args.seed, base_url)
        summary = build_pub11(out, base_url, args.seed, args.n_rs, args.n_non_rs,
                              n_probe=args.n_probe)
        print(f"demo world: {out}")
        print(f"  rows: {summary['rows']} {summary['rows_by_source']}")
        print(f"  expected: {summary['expected']}; aerial images: {summary['is_rs']}")
        print(f"  planted cases: {len(summary['planted'])} kinds, "
              f"{sum(summary['planted'].values())} rows; image files: {summary['image_files']}")
        print(f"  probe: {summary['probe']}")
    models_dir = os.path.join(out, "models")
    if fresh and _models_present(models_dir):
        log.info("tiny models in %s are present: kept", models_dir)
        return 0
    from pipelines.demo.tiny_models import build_tiny_models  # torch: only when needed

    paths = build_tiny_models(models_dir, args.seed)
    print(f"  models: {paths}")
    return 0


def _port_error(port: int) -> int:
    log.error(
        "port %d on 127.0.0.1 is already in use (another demo server still running?). "
        "Stop it, or pick another port with --port (the world must then be built with the "
        "same --port, since its URLs carry it).", port)
    return 2


def cmd_serve(args: argparse.Namespace) -> int:
    from pipelines.demo.server import DemoServer

    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    root = os.path.join(args.out, "www")
    if not os.path.isdir(root):
        log.error("%s does not exist: build the world first (python -m pipelines.demo build "
                  "--out %s --port %d)", root, args.out, args.port)
        return 2
    world = _read_world(args.out)
    want = base_url_for(args.port)
    if world and world.get("base_url") != want:
        log.error("the world in %s was built for %s, not %s: its URLs would miss this server. "
                  "Serve it with the port it was built for, or rebuild it.",
                  args.out, world.get("base_url"), want)
        return 2
    server = DemoServer(root, host="127.0.0.1", port=args.port)
    try:
        server.start()
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            return _port_error(args.port)
        raise
    try:
        log.info("demo server on %s (root %s)", server.base_url, root)
        if not cmd:
            log.info("no command given: serving until interrupted (Ctrl-C)")
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            try:
                while not stop.wait(3600):
                    pass
            except KeyboardInterrupt:
                pass
            return 0
        env = dict(os.environ, **{BASE_URL_ENV: server.base_url})
        log.info("running: %s", " ".join(cmd))
        try:
            proc = subprocess.Popen(cmd, env=env)
        except OSError as e:
            log.error("cannot run %s: %s", cmd[0], e)
            return 127
        previous = signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
        try:
            while True:
                try:
                    rc = proc.wait()
                    break
                except KeyboardInterrupt:  # the child got the SIGINT too; let it finish
                    continue
        finally:
            signal.signal(signal.SIGTERM, previous)
        if rc != 0:
            log.warning("command exited with %d", rc)
        return rc
    finally:
        server.stop()


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pipelines.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="write the demo world (and the tiny models)")
    b.add_argument("--out", required=True, help="world folder, e.g. data/demo")
    b.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help="port of the demo server the URLs point at (default %(default)s)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--if-missing", action="store_true",
                   help="do nothing when DIR/world.json matches these settings")
    b.add_argument("--n-rs", type=int, default=240, help="clean aerial rows")
    b.add_argument("--n-non-rs", type=int, default=120, help="everyday-photo rows")
    b.add_argument("--n-probe", type=int, default=150, help="probe images per class")
    b.set_defaults(func=cmd_build)

    s = sub.add_parser("serve", help="serve DIR/www around a command",
                       usage="python -m pipelines.demo serve --out DIR [--port N] -- CMD ARGS...")
    s.add_argument("--out", required=True, help="world folder, e.g. data/demo")
    s.add_argument("--port", type=int, default=DEFAULT_PORT)
    s.add_argument("cmd", nargs=argparse.REMAINDER, help="the command to run (after --)")
    s.set_defaults(func=cmd_serve)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
