"""``python -m pipelines.demo``: build the demo world, serve it, build a corpus from it.

    python -m pipelines.demo build --out data/demo [--port 8707] [--seed 0] [--if-missing]
    python -m pipelines.demo serve --out data/demo [--port 8707] -- CMD ARGS...
    python -m pipelines.demo run --out data/demo [--port 8707] --recipe rs5m -- RECIPE ARGS...
    python -m pipelines.demo bench-sets --out data/demo

``build`` writes the world (:func:`pipelines.demo.pub11.build_pub11`; its URLs point at
``http://127.0.0.1:<port>``), its captioned folder (:func:`pipelines.demo.local.build_local`),
its label-only archives for RS3 (:func:`pipelines.demo.rs3.build_rs3`), its annotated datasets
for RemoteCLIP (:func:`pipelines.demo.remoteclip.build_remoteclip`), its OSM extracts and
mosaics for SkyScript (:func:`pipelines.demo.skyscript.build_skyscript`) and the tiny models
(``DIR/models``: CLIP, the RS probe, and a BLIP-2 trained briefly on the demo scenes). ``--if-missing`` keeps a world whose ``world.json`` has
the same seed, base URL, parameters and generator version.

``serve`` starts the demo HTTP server on ``DIR/www``, runs ``CMD`` (with
``RS_CORPUS_DEMO_BASE_URL`` set), stops the server and exits with ``CMD``'s exit code. Without
a command it serves until interrupted.

``run`` is ``make build-rs5m`` on the demo world: it serves the world, runs the recipe with
the flags that point it at the world (:func:`pipelines.demo.recipes.recipe_args`; yours come
after and win), then scores the build against the world's ground truth.

``bench-sets`` writes the demo benchmark (``DIR/bench``) and the untrained tiny model
(``DIR/models/tiny-clip``) when missing: what ``make bench`` scores by default.
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
TINY_BLIP2_DIR = "tiny-blip2"


def _models_present(models_dir: str) -> bool:
    clip = os.path.join(models_dir, TINY_CLIP_DIR)
    probe = os.path.join(models_dir, RS_PROBE_FILE)
    return os.path.isdir(clip) and bool(os.listdir(clip)) and os.path.isfile(probe)


def cmd_build(args: argparse.Namespace) -> int:
    from pipelines.demo.pub11 import build_pub11

    out = args.out
    base_url = base_url_for(args.port)
    params = {"n_rs": args.n_rs, "n_non_rs": args.n_non_rs, "n_probe": args.n_probe}
    params["n_local"] = args.n_local
    params["n_rs3"] = args.n_rs3
    params["n_remoteclip"] = args.n_remoteclip
    params["n_skyscript"] = args.n_skyscript
    fresh = args.if_missing and world_is_current(out, args.seed, base_url, params)
    if fresh:
        log.info("demo world in %s is current (seed %d, %s): kept", out, args.seed, base_url)
    else:
        os.makedirs(out, exist_ok=True)
        log.info("building the demo world in %s (seed %d, %s)", out, args.seed, base_url)
        summary = build_pub11(out, base_url, args.seed, args.n_rs, args.n_non_rs,
                              n_probe=args.n_probe,
                              extra_params={"n_local": args.n_local, "n_rs3": args.n_rs3,
                                            "n_remoteclip": args.n_remoteclip,
                                            "n_skyscript": args.n_skyscript})
        print(f"demo world: {out}")
        print(f"  rows: {summary['rows']} {summary['rows_by_source']}")
        print(f"  expected: {summary['expected']}; aerial images: {summary['is_rs']}")
        print(f"  planted cases: {len(summary['planted'])} kinds, "
              f"{sum(summary['planted'].values())} rows; image files: {summary['image_files']}")
        print(f"  probe: {summary['probe']}")
        from pipelines.demo.local import build_local
        from pipelines.demo.remoteclip import OutOfDistinctScenes, build_remoteclip
        from pipelines.demo.rs3 import build_rs3
        from pipelines.demo.skyscript import build_skyscript

        try:
            local = build_local(out, args.seed, args.n_local)
            rs3 = build_rs3(out, args.seed, n_fmow=args.n_rs3, n_ben=args.n_rs3,
                            n_millionaid=args.n_rs3)
            rc = build_remoteclip(out, args.seed, n=args.n_remoteclip)
            sky = build_skyscript(out, args.seed, n=args.n_skyscript)
        except BaseException as e:
            os.remove(os.path.join(out, "world.json"))  # not a finished world
            if isinstance(e, OutOfDistinctScenes):  # a size asked for, not a bug: one line
                raise SystemExit(f"demo: {e}") from None
            raise
        print(f"  local folder: {local['rows']} table lines ({local['planted']} planted)")
        print(f"  rs3 archives: {rs3['rows']} entries {rs3['by_source']}")
        print(f"  remoteclip datasets: {rc['rows']} images {rc['by_source']}")
        print(f"  skyscript: {sky['rows']} truth rows {sky['by_expected']}")
    models_dir = os.path.join(out, "models")
    if fresh and _models_present(models_dir):
        log.info("tiny models in %s are present: kept", models_dir)
    else:
        from pipelines.demo.tiny_models import build_tiny_models  # torch: only when needed

        paths = build_tiny_models(models_dir, args.seed)
        print(f"  models: {paths}")
    # the tiny BLIP-2 keeps itself when its marker says it is finished (seed, version)
    from pipelines.demo.tiny_blip2 import build_tiny_blip2

    blip = build_tiny_blip2(os.path.join(models_dir, TINY_BLIP2_DIR), seed=args.seed)
    print(f"  captioner: {blip}")
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


def _flag_value(args: list[str], flag: str) -> str | None:
    """The last value of ``--flag V`` / ``--flag=V`` in ``args`` (argparse: the last wins)."""
    value = None
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def cmd_run(args: argparse.Namespace) -> int:
    from pipelines.demo.recipes import recipe_args

    extra = list(args.args)
    if extra and extra[0] == "--":
        extra = extra[1:]
    if not os.path.isfile(os.path.join(args.out, "world.json")):
        log.error("no demo world in %s: build it first (python -m pipelines.demo build --out %s)",
                  args.out, args.out)
        return 2
    argv = recipe_args(args.out, args.recipe) + extra
    output = _flag_value(argv, "--output") or f"out/{args.recipe}"
    if _flag_value(argv, "--output") is None:
        argv += ["--output", output]
    serve = argparse.Namespace(out=args.out, port=args.port,
                               cmd=[sys.executable, "-m", f"pipelines.recipes.{args.recipe}",
                                    *argv])
    rc = cmd_serve(serve)
    if rc == 0 and os.path.isfile(os.path.join(output, "stats.json")):
        from pipelines.demo import scoring

        print(scoring.report(output, args.out))
    return rc


def cmd_bench_sets(args: argparse.Namespace) -> int:
    from pipelines.demo.benchmarks import ensure_demo_benchmarks

    ensure_demo_benchmarks(os.path.join(args.out, "bench"), args.seed)
    clip = os.path.join(args.out, "models", TINY_CLIP_DIR)
    if not (os.path.isdir(clip) and os.listdir(clip)):
        from pipelines.demo.tiny_models import build_tiny_clip

        build_tiny_clip(clip, seed=args.seed)
    print(f"demo benchmark: {os.path.join(args.out, 'bench')}; baseline model: {clip}")
    return 0


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
    b.add_argument("--n-local", type=int, default=30, help="clean images of the captioned "
                   "folder (local/)")
    b.add_argument("--n-rs3", type=int, default=48, help="clean images per RS3 archive "
                   "(fMoW, BigEarthNet, MillionAID; rs3/)")
    b.add_argument("--n-remoteclip", type=int, default=24, help="clean images per annotated "
                   "dataset (remoteclip/)")
    b.add_argument("--n-skyscript", type=int, default=4, help="density of the SkyScript "
                   "place (OSM extracts + mosaics, skyscript/): 1 = about 120 objects, 4 = "
                   "about 290")
    b.set_defaults(func=cmd_build)

    s = sub.add_parser("serve", help="serve DIR/www around a command",
                       usage="python -m pipelines.demo serve --out DIR [--port N] -- CMD ARGS...")
    s.add_argument("--out", required=True, help="world folder, e.g. data/demo")
    s.add_argument("--port", type=int, default=DEFAULT_PORT)
    s.add_argument("cmd", nargs=argparse.REMAINDER, help="the command to run (after --)")
    s.set_defaults(func=cmd_serve)

    r = sub.add_parser("run", help="build a corpus from the served world and score it",
                       usage="python -m pipelines.demo run --out DIR [--port N] "
                             "[--recipe rs5m] -- RECIPE ARGS...")
    r.add_argument("--out", required=True, help="world folder, e.g. data/demo")
    r.add_argument("--port", type=int, default=DEFAULT_PORT)
    r.add_argument("--recipe", default="rs5m", help="rs5m | local | remoteclip | skyscript (default "
                   "%(default)s)")
    r.add_argument("args", nargs=argparse.REMAINDER, help="the recipe's flags (after --)")
    r.set_defaults(func=cmd_run)

    bs = sub.add_parser("bench-sets", help="the demo benchmark and the untrained tiny model")
    bs.add_argument("--out", required=True, help="world folder, e.g. data/demo")
    bs.add_argument("--seed", type=int, default=0)
    bs.set_defaults(func=cmd_bench_sets)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
