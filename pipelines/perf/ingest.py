"""``make perf-ingest``: our fetch → resize → shard throughput against img2dataset's, in one run.

What is measured, and how (run ``python -m pipelines.perf.ingest --help`` for the flags):

1. A deterministic image world: ``--n`` JPEGs of ``--size``² pixels at quality 90 (aerial scenes
   from :mod:`pipelines.demo.scenes` when it imports, else numpy textures), cached in the
   workdir, and a LAION-style url list (``url``, ``caption``) in parquet pointing at them.
2. :class:`~pipelines.demo.server.DemoServer` on 127.0.0.1 in its own process (its GIL must not
   compete with the tool being measured). The server also notes when each request arrives.
3. img2dataset, from its own virtualenv ``.venv-perf`` (created here on first use: its pins
   conflict with ours), with settings equal to ours, and our pipeline (read → fetch →
   decode/resize → :class:`~pipelines.sinks.shards.WriteBuild`) on Beam's FnApiRunner, each as
   a subprocess of this one. Both write webdataset shards with ``jpg``/``txt``/``json`` per
   sample.
4. Per run: wall time of the whole command (start-up included), the active span (first request
   seen by the server → last shard file written) and its tail after the last request,
   images/s = samples in the shards / wall s, CPU seconds of the tool's process tree (and of the
   server meanwhile), peak memory (sums over the process tree of RSS, sampled every 0.1 s, and
   of PSS, every 0.5 s: see :class:`TreeMemorySampler`) and
   the samples found in the tars (checked == N, each with its jpg, txt and json).

5. The machine's per-core limit for this work, measured in the same run before the tools:
   decode a world JPEG from bytes in memory, resize to ``--image_size``, encode at
   ``--encode_quality``, no I/O. Each library alone in one process first (PIL with ``draft``,
   OpenCV with ``IMREAD_REDUCED_*``, simplejpeg when installed: all decode at the target
   scale); then the fastest in one process per core at once (cores = ``--processes``, at most
   the cores this process may use). Each tool's active-phase rate is printed as a share of
   that limit x cores.

6. Stragglers (``--stragglers FRACTION:SECONDS``, default 2% of the URLs answering after
   3 s): one more round of each tool at the smallest N, as slow and dying hosts do on the web.
   A fetch that waits for the slowest URL of every batch collapses here (ours did, at 0.19x
   img2dataset, before the fetch stage streamed); loopback alone never shows it.

Run order: the per-core limit; one warm-up run of each tool on a small url list (page cache,
``.pyc`` files, the server's first connections), not reported; then, for each N of ``--n``
(default 2000 and 8000), ``--repeats`` rounds, alternating which tool goes first; a table of
each tool's median run per N. The last line printed is ``ratio <ours img/s ÷ img2dataset
img/s>`` for the last N (8000 by default).

Fairness notes (the line above the table repeats the settings of the run):

* img2dataset parallelises by shard (one shard = one subjob = one process), so with N=2000 and
  its default 10 000 samples per shard it would use one of its processes. Both tools are given
  ``--samples_per_shard`` = ceil(N / processes) by default so each can use every process.
* Things img2dataset does that we do not are switched off (EXIF extraction into the json, wandb);
  it still computes sha256 (we do too, plus a pHash). It re-encodes every image like we do.
* Beam's ``DirectRunner`` tries to download a Prism binary first (no network here; elsewhere it
  would silently change runner), so ours names the runner it falls back to: ``FnApiRunner``.
  ``--running_mode`` picks its mode. ``in_memory`` (the default, and DirectRunner's) runs one
  worker in the launching process, and ours then fetches and decodes in ``--processes``
  forked fetch processes (``FetchConfig.processes``), outside that worker's GIL: one process
  with 64 threads was GIL-bound at ~1.06 cores (N=8000 on 2 cores: 40-41 s -> 32-36 s with 2
  fetch processes, the request phase 28 s -> 19 s). ``multi_processing`` (here with one
  fetch process per SDK worker) was slower: 60 s at N=8000 against 52 s for in_memory in
  the same conditions; worker processes cost ~2 s of start-up, and every kept image then
  crosses the data plane to the sink, which doubled the tail to 15.6 s and the peak memory
  to 2.9 GiB. ``multi_threading`` is offered but not trusted: in Beam 2.77 it sometimes drops
  elements on the way into a GroupByKey (the shards then hold fewer samples than stats.json
  says were kept); the tar count here catches that and marks the run "NO".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

log = logging.getLogger("perf-ingest")

REPO = Path(__file__).resolve().parents[2]
PERF_VENV = REPO / ".venv-perf"
#: the img2dataset release this harness was written against (override: --img2dataset_spec)
IMG2DATASET_SPEC = "img2dataset==1.47.0"
SUBSET = "perf"
#: which FnApiRunner mode ours uses unless told otherwise: the fastest measured here (see the
#: module docstring); it is also what DirectRunner itself falls back to by default
DEFAULT_RUNNING_MODE = "in_memory"
RUNNING_MODES = ("in_memory", "multi_threading", "multi_processing")
_WORLD_VERSION = 1  # bump when the generated images change
_SCENE_BASES = 256  # distinct scene renders; the rest of the N images are dihedral variants


# --- 1. the image world -----------------------------------------------------------------------


def _texture(i: int, size: int) -> Any:
    """A deterministic RGB texture (three octaves of smooth noise plus grain)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng([_WORLD_VERSION, i])
    acc = np.zeros((size, size, 3), np.float32)
    for cells, amp in ((4, 1.0), (16, 0.5), (64, 0.25)):
        small = Image.fromarray(rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8), "RGB")
        acc += amp * np.asarray(small.resize((size, size), Image.Resampling.BICUBIC), np.float32)
    acc = acc / 1.75 + rng.normal(0.0, 6.0, acc.shape).astype(np.float32)
    return Image.fromarray(np.clip(acc, 0, 255).astype(np.uint8), "RGB")


def _scene_base(j: int, size: int) -> tuple[Any, str]:
    import numpy as np

    from pipelines.demo.scenes import CLASSES, render_scene

    cls = CLASSES[j % len(CLASSES)]
    img, _ = render_scene(cls, np.random.default_rng([_WORLD_VERSION, j]), size)
    return img.convert("RGB"), cls


def _variant(base: Any, i: int) -> Any:
    """Image ``i`` from its scene render: one of the 8 dihedral transforms, then a roll."""
    from PIL import Image

    img = base
    variant = (i // _SCENE_BASES) % 8
    if variant:
        img = img.transpose(list(Image.Transpose)[variant - 1])
    shift = (i // (_SCENE_BASES * 8)) * 7
    if shift:
        import numpy as np

        img = Image.fromarray(np.roll(np.asarray(img), shift, axis=(0, 1)))
    return img


def _make_images(job: tuple[str, int, int, list[tuple[int, str]]]) -> list[tuple[int, str]]:
    """Write images ``[(i, path)]`` of the world; all share one base (scenes: one render).

    Returns (i, caption) per image.
    """
    kind, base_index, size, items = job
    made = []
    base, cls = _scene_base(base_index, size) if kind == "scenes" else (None, "")
    for i, path in items:
        if kind == "scenes":
            img = _variant(base, i)
            caption = f"an aerial image of {cls.replace('_', ' ')}, number {i}"
        else:
            img = _texture(i, size)
            caption = f"a synthetic texture, number {i}"
        tmp = f"{path}.tmp"
        img.save(tmp, "JPEG", quality=90)
        os.replace(tmp, path)
        made.append((i, caption))
    return made


def image_kind(requested: str) -> str:
    if requested != "auto":
        return requested
    try:
        import pipelines.demo.scenes  # noqa: F401
    except Exception:  # noqa: BLE001 — any import problem: fall back to textures
        return "texture"
    return "scenes"


def make_world(
    workdir: Path, n: int, size: int, kind: str, processes: int = 2
) -> tuple[Path, list[str]]:
    """``{root}/img/{i:06d}.jpg`` for i < n (cached across runs); (root, captions)."""
    root = workdir / f"world-{kind}-{size}-v{_WORLD_VERSION}"
    img = root / "img"
    img.mkdir(parents=True, exist_ok=True)
    captions_file = root / "captions.json"
    captions: dict[str, str] = (
        json.loads(captions_file.read_text()) if captions_file.exists() else {}
    )
    missing = [i for i in range(n)
               if str(i) not in captions or not (img / f"{i:06d}.jpg").exists()]
    if missing:
        groups: dict[int, list[tuple[int, str]]] = {}
        for i in missing:
            base = i % _SCENE_BASES if kind == "scenes" else i // 16
            groups.setdefault(base, []).append((i, str(img / f"{i:06d}.jpg")))
        jobs = [(kind, base, size, items) for base, items in sorted(groups.items())]
        log.info("generating %d %s images of %dx%d in %s (cached for later runs)",
                 len(missing), kind, size, size, img)
        t0 = time.monotonic()
        if len(jobs) > 1 and processes > 1:
            with multiprocessing.get_context("spawn").Pool(processes) as pool:
                made = pool.map(_make_images, jobs, chunksize=1)
        else:
            made = [_make_images(job) for job in jobs]
        captions.update({str(i): cap for group in made for i, cap in group})
        captions_file.write_text(json.dumps(captions))
        log.info("generated in %.1fs", time.monotonic() - t0)
    return root, [captions[str(i)] for i in range(n)]


def straggler_every(fraction: float) -> int:
    """Every how many URLs one is slow, for a straggler ``fraction`` > 0."""
    return max(1, round(1 / fraction))


def write_url_list(path: Path, base_url: str, captions: Sequence[str],
                   slow: tuple[float, float] | None = None) -> Path:
    """A LAION-style parquet (``url``, ``caption``): one row per image, default row groups.

    ``slow`` = (fraction, seconds): that share of the rows, evenly spaced, ask the server to
    answer after that many seconds (``/slow/<s>/img/...``), as slow and dying hosts do on the
    web."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    every = straggler_every(slow[0]) if slow and slow[0] > 0 else 0
    urls = [f"{base_url}/slow/{slow[1]:g}/img/{i:06d}.jpg" if every and i % every == every // 2
            else f"{base_url}/img/{i:06d}.jpg" for i in range(len(captions))]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"url": urls, "caption": list(captions)}), path)
    return path


# --- 2. the server, in its own process ----------------------------------------------------------


def _serve(root: str, conn: Any) -> None:
    """Serve ``root`` until told to stop; answer ``"span"`` with (requests, first, last)."""
    logging.disable(logging.CRITICAL)
    from pipelines.demo.server import DemoServer

    lock = threading.Lock()
    span: dict[str, Any] = {"n": 0, "first": None, "last": None, "cpu0": time.process_time()}
    with DemoServer(root) as srv:
        inner = getattr(getattr(srv, "_server", None), "count", None)
        if inner is not None:  # note arrival times; the server itself is unchanged

            def count(path: str) -> int:
                now = time.time()
                with lock:
                    span["n"] += 1
                    span["first"] = span["first"] or now
                    span["last"] = now
                return inner(path)

            srv._server.count = count  # type: ignore[union-attr,method-assign]
        conn.send(srv.base_url)
        while True:
            msg = conn.recv()
            if msg == "span":
                with lock:
                    now_cpu = time.process_time()
                    conn.send(dict(span, cpu_s=now_cpu - span["cpu0"]))
                    span.update(n=0, first=None, last=None, cpu0=now_cpu)
            else:
                break
    conn.send("stopped")


class ServerProcess:
    """:class:`DemoServer` in a separate (spawned) process."""

    def __init__(self, root: Path) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(str(root), child), daemon=True,
                                 name="perf-ingest-server")
        self.base_url = ""

    def __enter__(self) -> Self:
        self._proc.start()
        if not self._conn.poll(60):
            raise RuntimeError("the demo server process did not start within 60 s")
        self.base_url = self._conn.recv()
        return self

    def span(self) -> dict[str, Any]:
        """Since the last call: requests, arrival times of the first and last, server CPU s."""
        self._conn.send("span")
        return self._conn.recv()

    def __exit__(self, *exc: object) -> None:
        try:
            self._conn.send("stop")
            self._conn.poll(10)
        except (OSError, EOFError):
            pass
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)


# --- 3. the tools ---------------------------------------------------------------------------


def ensure_img2dataset(venv: Path = PERF_VENV, spec: str = IMG2DATASET_SPEC) -> Path:
    """The ``img2dataset`` executable of ``venv``, creating the venv and installing it if needed."""
    exe = venv / "bin" / "img2dataset"
    if exe.exists():
        return exe
    python = shutil.which("python3.11") or sys.executable
    if not (venv / "bin" / "python").exists():
        log.info("creating %s for img2dataset (first run only; its pins conflict "
                 "with the project's, so it gets its own venv)", venv)
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
    log.info("installing %s into %s (first run only, a few minutes)", spec, venv)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", spec], check=True)
    if not exe.exists():
        raise RuntimeError(f"{spec} installed into {venv} but {exe} is missing")
    return exe


def _quiet_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        NO_ALBUMENTATIONS_UPDATE="1",  # albumentations asks PyPI for updates on import
        WANDB_MODE="disabled",
        WANDB_SILENT="true",
        PYTHONWARNINGS="ignore",
        # a proxy setting in the environment must not send loopback traffic elsewhere
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    return env


@dataclasses.dataclass(frozen=True)
class Settings:
    processes: int
    threads: int
    image_size: int
    resize_mode: str
    encode_quality: int
    samples_per_shard: int
    timeout: int
    running_mode: str
    in_flight: int | None


def img2dataset_command(exe: Path, url_list: Path, output: Path, s: Settings) -> list[str]:
    return [
        str(exe),
        "--url_list", str(url_list),
        "--input_format", "parquet",
        "--url_col", "url",
        "--caption_col", "caption",
        "--output_format", "webdataset",
        "--output_folder", str(output),
        "--image_size", str(s.image_size),
        "--resize_mode", s.resize_mode,
        "--encode_format", "jpg",
        "--encode_quality", str(s.encode_quality),
        "--processes_count", str(s.processes),
        "--thread_count", str(s.threads),
        "--number_sample_per_shard", str(s.samples_per_shard),
        "--timeout", str(s.timeout),
        "--retries", "0",
        "--extract_exif", "False",
        "--compute_hash", "sha256",
        "--enable_wandb", "False",
        "--distributor", "multiprocessing",
    ]


def ours_command(url_list: Path, output: Path, s: Settings) -> list[str]:
    cmd = [
        sys.executable, "-m", "pipelines.perf.ingest", "--_ours",
        "--url_list", str(url_list),
        "--output", str(output),
        "--processes", str(s.processes),
        "--threads", str(s.threads),
        "--image_size", str(s.image_size),
        "--resize_mode", s.resize_mode,
        "--encode_quality", str(s.encode_quality),
        "--samples_per_shard", str(s.samples_per_shard),
        "--timeout", str(s.timeout),
        "--running_mode", s.running_mode,
    ]
    if s.in_flight:
        cmd += ["--in_flight", str(s.in_flight)]
    return cmd


# --- our side: the pipeline that is measured ---------------------------------------------------


def build_ingest(p: Any, url_glob: str, output: str, s: Settings) -> Any:
    """read → fetch + decode/resize (in the fetch threads) → shards, on pipeline ``p``; the
    stats PCollection.

    The same stages and sink as a recipe (``pipelines/recipes/rs5m.py``) minus its filters,
    dedup and models. The Reshuffle after reading stands in for the recipe's URL dedup (a
    GroupByKey on the url), which is what spreads one big parquet row group over the workers.
    """
    import apache_beam as beam

    from pipelines.records import REJECTS
    from pipelines.sinks.shards import WriteBuild
    from pipelines.sources.laion import ColumnMap, ReadLaionParquet
    from pipelines.stages.fetch import Fetch, FetchConfig
    from pipelines.stages.images import ImageConfig

    read = p | "Read" >> ReadLaionParquet(url_glob, ColumnMap(url_col="url", caption_col="caption"),
                                          SUBSET)
    spread = read.records | "Spread" >> beam.Reshuffle()
    fetched = spread | "FetchDecode" >> Fetch(
        # the local image server listens on 127.0.0.1: exempt loopback from the address guard
        FetchConfig(timeout=float(s.timeout), retries=0, threads=s.threads,
                    allow_networks=("127.0.0.0/8",), processes=fetch_processes(s)),
        in_flight=s.in_flight,
        decode=ImageConfig(image_size=s.image_size, resize_mode=s.resize_mode,
                           encode_quality=s.encode_quality),
    )
    inputs = (read.records, read[REJECTS]) | "AllInputs" >> beam.Flatten()
    rejects = (read[REJECTS], fetched[REJECTS]) | "AllRejects" >> beam.Flatten()
    duplicates = p | "NoDuplicates" >> beam.Create([])
    manifest = {"recipe": "perf-ingest", "config": dataclasses.asdict(s)}
    return {
        "inputs": inputs, "kept": fetched.records, "rejects": rejects, "duplicates": duplicates,
    } | "Write" >> WriteBuild(output, "perf-ingest", SUBSET, manifest, s.samples_per_shard)


def fetch_processes(s: Settings) -> int:
    """Fetch worker processes of ours: ``--processes`` with the one in-memory SDK worker (they
    fetch and decode outside its GIL), else 1 (the runner's workers are the processes)."""
    return max(1, s.processes) if s.running_mode == "in_memory" else 1


def beam_options(s: Settings) -> Any:
    from apache_beam.options.pipeline_options import PipelineOptions

    argv = ["--runner=FnApiRunner", f"--direct_running_mode={s.running_mode}"]
    if s.running_mode != "in_memory":
        argv.append(f"--direct_num_workers={s.processes}")
    return PipelineOptions(argv)


def run_ours(url_list: str, output: str, s: Settings) -> dict[str, Any]:
    """Run our ingest pipeline to completion; the build's stats.json document."""
    import apache_beam as beam

    with beam.Pipeline(options=beam_options(s)) as p:
        build_ingest(p, url_list, output, s)
    return json.loads((Path(output) / "stats.json").read_text())


# --- 4. measuring ----------------------------------------------------------------------------


class TreeMemorySampler(threading.Thread):
    """Peaks of the summed RSS and of the summed PSS of a process and all its descendants,
    sampled every ``interval``.

    RSS counts a page in every process that maps it, so a forked worker is charged again for
    every page it shares with its parent; PSS (proportional set size, Linux) charges a shared
    page 1/n to each of its n processes, so the sum is the tree's real footprint. Both tools
    fork workers, so both figures are printed; PSS is 0 where the platform lacks it. PSS is
    read every ``pss_every``-th sample: it walks the page tables, and reading it ten times a
    second cost the sampler ~15% of a core, taken from the tool being measured.
    """

    def __init__(self, pid: int, interval: float = 0.1, pss_every: int = 5) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.pid = pid
        self.interval = interval
        self.pss_every = pss_every
        self.peak = 0
        self.peak_pss = 0
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            import psutil  # present with the project's dependencies; not worth failing over
        except ImportError:
            log.warning("psutil is not installed: peak memory is not measured")
            return
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop_event.is_set():
            total = pss = 0
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            full = self.samples % self.pss_every == 0
            for proc in procs:
                try:
                    info = proc.memory_full_info() if full else proc.memory_info()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                total += info.rss
                pss += getattr(info, "pss", 0)
            self.peak = max(self.peak, total)
            self.peak_pss = max(self.peak_pss, pss)
            self.samples += 1
            self._stop_event.wait(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join(5)
        return self.peak


def count_samples(folder: Path) -> tuple[int, int, float | None]:
    """(samples, complete samples, mtime of the newest tar) over every ``*.tar`` under ``folder``.

    A sample is a ``.jpg`` member; complete when its ``.txt`` and ``.json`` are there too.
    """
    jpg: set[str] = set()
    others: dict[str, set[str]] = {}
    newest = None
    for tar_path in sorted(folder.rglob("*.tar")):
        newest = max(newest or 0.0, tar_path.stat().st_mtime)
        with tarfile.open(tar_path) as tar:
            for name in tar.getnames():
                stem, _, ext = os.path.basename(name).partition(".")
                if ext == "jpg":
                    jpg.add(f"{tar_path.name}/{stem}")
                else:
                    others.setdefault(f"{tar_path.name}/{stem}", set()).add(ext)
    complete = sum(1 for k in jpg if {"txt", "json"} <= others.get(k, set()))
    return len(jpg), complete, newest


@dataclasses.dataclass
class RunResult:
    tool: str
    wall_s: float
    active_s: float | None  # first request at the server → last shard written
    startup_s: float | None  # command start → first request at the server
    tail_s: float | None  # last request at the server → last shard written
    cpu_s: float  # user + sys CPU seconds of the tool's whole process tree
    server_cpu_s: float  # CPU seconds the server process spent meanwhile
    samples: int
    complete: int
    peak_rss: int
    rc: int
    log: str
    failures: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> samples
    peak_pss: int = 0  # peak summed PSS (0: not measured)

    @property
    def img_per_s(self) -> float:
        return self.samples / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def active_img_per_s(self) -> float | None:
        return self.samples / self.active_s if self.active_s else None


def measure(tool: str, cmd: list[str], output: Path, server: ServerProcess, log_path: Path,
            timeout: float) -> RunResult:
    """Run ``cmd`` (writing into ``output``) and measure it."""
    shutil.rmtree(output, ignore_errors=True)
    server.span()  # reset the request window
    with open(log_path, "w") as logf:
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0_wall = time.time()
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=REPO,
                                env=_quiet_env())
        sampler = TreeMemorySampler(proc.pid)
        sampler.start()
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        wall = time.monotonic() - t0
        peak = sampler.stop()
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    # every descendant was waited for by its parent, so its CPU time is in RUSAGE_CHILDREN
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    span = server.span()
    samples, complete, newest = count_samples(output) if output.exists() else (0, 0, None)
    first = span.get("first")
    active = (newest - first) if (first and newest) else None
    startup = (first - t0_wall) if first else None
    last = span.get("last")
    tail = (newest - last) if (last and newest) else None
    if rc != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        log.warning("%s exited with %d; last lines of %s:\n%s", tool, rc, log_path, tail)
    return RunResult(tool, wall, active, startup, tail, cpu, span.get("cpu_s", 0.0), samples,
                     complete, peak, rc, str(log_path), failures(output),
                     peak_pss=sampler.peak_pss)


def failures(output: Path) -> dict[str, int]:
    """Why samples are missing: our stats.json reject counts, or img2dataset's status dicts."""
    found: dict[str, int] = {}
    stats = output / "stats.json"
    if stats.exists():
        for c in json.loads(stats.read_text()).get("counts", []):
            if c.get("outcome") != "kept":
                key = f"{c.get('stage')}/{c.get('reason')}"
                found[key] = found.get(key, 0) + int(c.get("count", 0))
    for path in output.glob("*_stats.json") if output.exists() else []:
        for reason, n in json.loads(path.read_text()).get("status_dict", {}).items():
            if reason != "success":
                found[reason[:120]] = found.get(reason[:120], 0) + int(n)
    return found


# --- 5. the report ---------------------------------------------------------------------------


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: Sequence[RunResult], n: int) -> str:
    head = (f"{'tool':<12} {'wall s':>7} {'startup s':>9} {'active s':>8} {'tail s':>6} "
            f"{'samples':>8} "
            f"{'ok':>3} {'img/s':>7} {'active img/s':>12} {'cpu s':>6} {'server cpu s':>12} "
            f"{'peak RSS MiB':>12} {'peak PSS MiB':>12}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.tool:<12} {r.wall_s:>7.2f} {_fmt(r.startup_s, '.2f'):>9} "
            f"{_fmt(r.active_s, '.2f'):>8} {_fmt(r.tail_s, '.2f'):>6} {r.samples:>8} "
            f"{'yes' if r.samples == n and r.complete == n and r.rc == 0 else 'NO':>3} "
            f"{r.img_per_s:>7.1f} {_fmt(r.active_img_per_s, '.1f'):>12} {r.cpu_s:>6.1f} "
            f"{r.server_cpu_s:>12.1f} {_fmt(r.peak_rss / 2**20 if r.peak_rss else None, '.0f'):>12}"
            f" {_fmt(r.peak_pss / 2**20 if r.peak_pss else None, '.0f'):>12}"
        )
    return "\n".join(lines)


def median_run(runs: Sequence[RunResult]) -> RunResult:
    """The run with the median images/s (the lower middle one for an even count)."""
    ordered = sorted(runs, key=lambda r: r.img_per_s)
    return ordered[(len(ordered) - 1) // 2]


# --- CLI ---------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m pipelines.perf.ingest",
        description="fetch → resize → shard throughput: rs-corpus (Beam) vs img2dataset, on "
        "loopback. The last line printed is `ratio <ours/img2dataset>` (images/s, whole "
        "command).",
    )
    ap.add_argument("--n", default="2000,8000",
                    help="images per run, comma-separated sizes measured one after the other "
                    "(default %(default)s); the last line's ratio is the last size's")
    ap.add_argument("--size", type=int, default=512, help="source image side, pixels")
    ap.add_argument("--processes", type=int, default=2, help="worker processes of each tool")
    ap.add_argument("--threads", type=int, default=64, help="download threads per process")
    ap.add_argument("--image_size", type=int, default=256)
    ap.add_argument("--resize_mode", default="border",
                    choices=["no", "keep_ratio", "center_crop", "border"])
    ap.add_argument("--encode_quality", type=int, default=95)
    ap.add_argument("--timeout", type=int, default=10, help="seconds per request")
    ap.add_argument("--samples_per_shard", type=int,
                    help="both tools (default: ceil(n / processes), so img2dataset, which "
                    "parallelises by shard, can use every process)")
    ap.add_argument("--running_mode", choices=RUNNING_MODES, default=DEFAULT_RUNNING_MODE,
                    help="Beam FnApiRunner mode for ours (default %(default)s: one worker, "
                    "fastest measured on 2 cores at N=2000; multi_processing runs --processes "
                    "workers; multi_threading loses elements before a GroupByKey in Beam 2.77, "
                    "the tar count check flags it)")
    ap.add_argument("--in_flight", type=int,
                    help="most fetches at once in ours (default: --threads x fetch processes)")
    ap.add_argument("--stragglers", default="0.02:3",
                    help="FRACTION:SECONDS: one more round of each tool at the smallest N in "
                    "which that share of the URLs answers after that many seconds, as slow "
                    "and dying hosts do on the web (default %(default)s; 0:0 skips it)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="measured rounds after the warm-up, alternating which tool goes first")
    ap.add_argument("--warmup", type=int, default=200,
                    help="images in the warm-up run of each tool (0: no warm-up)")
    ap.add_argument("--images", choices=["auto", "scenes", "texture"], default="auto",
                    help="what the images show (auto: demo scenes when available)")
    ap.add_argument("--tools", default="img2dataset,ours",
                    help="comma-separated subset of img2dataset,ours")
    ap.add_argument("--workdir", type=Path,
                    default=Path(tempfile.gettempdir()) / "rs-corpus-perf-ingest",
                    help="images (cached), url lists, outputs and logs")
    ap.add_argument("--img2dataset_spec", default=IMG2DATASET_SPEC,
                    help="pip requirement installed into .venv-perf on first use")
    ap.add_argument("--limit_images", type=int, default=400,
                    help="images per process when measuring the per-core limit (0: skip it)")
    ap.add_argument("--run_timeout", type=float, default=1800, help="seconds per tool run")
    # internal: run only our pipeline (this is what the harness measures)
    ap.add_argument("--_ours", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--url_list", help=argparse.SUPPRESS)
    ap.add_argument("--output", help=argparse.SUPPRESS)
    return ap


def stragglers(args: argparse.Namespace) -> tuple[float, float] | None:
    """``--stragglers FRACTION:SECONDS`` as (fraction, seconds); None when either is 0."""
    try:
        fraction, seconds = (float(x) for x in str(args.stragglers).split(":"))
    except ValueError:
        raise SystemExit(f"--stragglers: FRACTION:SECONDS, not {args.stragglers!r}") from None
    if not 0 <= fraction <= 1 or seconds < 0:
        raise SystemExit(f"--stragglers: a fraction in [0, 1] and seconds >= 0, not "
                         f"{args.stragglers!r}")
    return (fraction, seconds) if fraction > 0 and seconds > 0 else None


def sizes(args: argparse.Namespace) -> list[int]:
    """The N values of ``--n`` (``"2000,8000"``), in the order given."""
    ns = [int(x) for x in str(args.n).split(",") if x.strip()]
    if not ns or min(ns) < 1:
        raise SystemExit(f"--n: positive image counts, comma-separated, not {args.n!r}")
    return ns


def settings(args: argparse.Namespace, n: int | None = None) -> Settings:
    n = n if n is not None else sizes(args)[-1]
    per_shard = args.samples_per_shard or max(1, math.ceil(n / max(1, args.processes)))
    return Settings(
        processes=args.processes, threads=args.threads, image_size=args.image_size,
        resize_mode=args.resize_mode, encode_quality=args.encode_quality,
        samples_per_shard=per_shard, timeout=args.timeout, running_mode=args.running_mode,
        in_flight=args.in_flight,
    )


# --- the machine's per-core limit for this work ---------------------------------------------------


def _limit_pil(image_size: int, quality: int) -> Any:
    import io

    from PIL import Image

    def run(data: bytes) -> bytes:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            scale = image_size / max(w, h)
            target = (max(1, round(w * scale)), max(1, round(h * scale)))
            im.draft("RGB", target)  # libjpeg's DCT scaling: decode at the target scale
            rgb = im.convert("RGB")
        if rgb.size != target:
            rgb = rgb.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
        out = io.BytesIO()
        rgb.save(out, "JPEG", quality=quality, subsampling=2)
        return out.getvalue()

    return run


def _limit_opencv(image_size: int, quality: int) -> Any:
    import cv2
    import numpy as np

    cv2.setNumThreads(1)  # one process per core: no pool threads of its own
    params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    reduced = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
               8: cv2.IMREAD_REDUCED_COLOR_8}

    def run(data: bytes) -> bytes:
        buf = np.frombuffer(data, np.uint8)
        # the header's size is not known to OpenCV before decoding: the world's size is fixed,
        # so the first image's factor is reused (as a per-core *limit* may assume)
        factor = run.factor  # type: ignore[attr-defined]
        img = cv2.imdecode(buf, reduced.get(factor, cv2.IMREAD_COLOR))
        h, w = img.shape[:2]
        scale = image_size / max(w, h)
        target = (max(1, round(w * scale)), max(1, round(h * scale)))
        if (w, h) != target:
            img = cv2.resize(img, target, interpolation=cv2.INTER_AREA)
        _, enc = cv2.imencode(".jpg", img, params)
        return enc.tobytes()

    run.factor = 1  # type: ignore[attr-defined]

    def first(data: bytes) -> bytes:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        side = max(img.shape[:2])
        run.factor = max([f for f in (1, 2, 4, 8) if side / f >= image_size])  # type: ignore[attr-defined]
        return run(data)

    run.first = first  # type: ignore[attr-defined]
    return run


def _limit_simplejpeg(image_size: int, quality: int) -> Any:
    import numpy as np
    import simplejpeg  # not a dependency: measured when installed
    from PIL import Image

    def run(data: bytes) -> bytes:
        w, h = simplejpeg.decode_jpeg_header(data)[:2]
        scale = image_size / max(w, h)
        target = (max(1, round(w * scale)), max(1, round(h * scale)))
        factor = max(f for f in (1, 2, 4, 8) if max(w, h) / f >= image_size)
        arr = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=h // factor,
                                     min_width=w // factor)
        img = Image.fromarray(arr)
        if img.size != target:
            img = img.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
        return simplejpeg.encode_jpeg(np.asarray(img), quality=quality, colorsubsampling="420")

    return run


LIMIT_LIBRARIES = {"pil": _limit_pil, "opencv": _limit_opencv, "simplejpeg": _limit_simplejpeg}


def _limit_worker(lib: str, paths: list[str], count: int, image_size: int, quality: int,
                  barrier: Any, results: Any) -> None:
    """One process: ``count`` decode → resize → encode passes over the images, no I/O in the
    timed part; puts (library, images/s of wall time) on ``results`` (None: not installed)."""
    try:
        fn = LIMIT_LIBRARIES[lib](image_size, quality)
    except ImportError:
        barrier.abort()
        results.put((lib, None))
        return
    datas = [Path(p).read_bytes() for p in paths]
    getattr(fn, "first", fn)(datas[0])
    for d in datas[:8]:  # warm caches and lazy imports
        fn(d)
    try:
        barrier.wait(120)
    except threading.BrokenBarrierError:
        pass
    t0 = time.perf_counter()
    for i in range(count):
        fn(datas[i % len(datas)])
    results.put((lib, count / (time.perf_counter() - t0)))


def _limit_round(lib: str, processes: int, paths: list[str], count: int, image_size: int,
                 quality: int) -> list[float | None]:
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_limit_worker, daemon=True, name=f"limit-{lib}",
                         args=(lib, paths, count, image_size, quality, barrier, results))
             for _ in range(processes)]
    for proc in procs:
        proc.start()
    rates = [results.get(timeout=600)[1] for _ in procs]
    for proc in procs:
        proc.join(30)
    return rates


@dataclasses.dataclass
class Limit:
    library: str  # the fastest library measured
    per_library: dict[str, float]  # images/s of one process alone, per library
    cores: int  # processes run at once, one per core
    per_core: float  # images/s of one process while every core runs one (mean)

    @property
    def total(self) -> float:
        return self.per_core * self.cores


def per_core_limit(root: Path, n: int, image_size: int, quality: int, cores: int,
                   count: int) -> Limit | None:
    """The machine's per-core limit for this work, measured now: decode a world JPEG, resize
    to ``image_size``, encode at ``quality``, from bytes in memory. Each library alone in one
    process first; then the fastest in ``cores`` processes at once (one per core)."""
    if count <= 0:
        return None
    paths = [str(root / "img" / f"{i:06d}.jpg") for i in range(min(n, 64))]
    alone: dict[str, float] = {}
    for lib in LIMIT_LIBRARIES:
        rate = _limit_round(lib, 1, paths, count, image_size, quality)[0]
        if rate is not None:
            alone[lib] = rate
    if not alone:
        return None
    best = max(alone, key=alone.__getitem__)
    rates = [r for r in _limit_round(best, cores, paths, count, image_size, quality) if r]
    return Limit(best, alone, cores, sum(rates) / max(1, len(rates)))


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def benchmark(args: argparse.Namespace) -> dict[str, RunResult]:
    """Everything but the final ratio line: per N, the table of median runs; returns the
    median runs of the last N, per tool."""
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = set(tools) - {"img2dataset", "ours"}
    if unknown or not tools:
        raise SystemExit(f"--tools: unknown {sorted(unknown)}; use img2dataset and/or ours")
    ns = sizes(args)
    slow = stragglers(args)  # a bad --stragglers fails now, not after the timed rounds
    exe = ensure_img2dataset(spec=args.img2dataset_spec) if "img2dataset" in tools else None
    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    kind = image_kind(args.images)
    root, all_captions = make_world(work, max(ns), args.size, kind,
                                    processes=max(1, args.processes))
    cores = max(1, min(args.processes, available_cores()))
    limit = per_core_limit(root, max(ns), args.image_size, args.encode_quality, cores,
                           args.limit_images)
    if limit is not None:
        log.info("per-core limit: %s", limit)

    def command(tool: str, url_list: Path, out: Path, st: Settings) -> list[str]:
        if tool == "img2dataset":
            assert exe is not None
            return img2dataset_command(exe, url_list, out, st)
        return ours_command(url_list, out, st)

    results: dict[int, dict[str, RunResult]] = {}
    all_runs: dict[int, dict[str, list[RunResult]]] = {}
    with ServerProcess(root) as server:
        log.info("server %s (pid of its own), %d %s images of %dx%d", server.base_url, max(ns),
                 kind, args.size, args.size)
        if args.warmup > 0:
            m = min(args.warmup, max(ns))
            warm_urls = write_url_list(work / "urls-warmup" / "urls.parquet", server.base_url,
                                       all_captions[:m])
            s0 = settings(args, m)
            warm = dataclasses.replace(s0, samples_per_shard=max(1, math.ceil(m / s0.processes)))
            for tool in tools:
                r = measure(tool, command(tool, warm_urls, work / f"out-warmup-{tool}", warm),
                            work / f"out-warmup-{tool}", server, work / f"warmup-{tool}.log",
                            args.run_timeout)
                log.info("warm-up %s: %d/%d samples in %.2fs", tool, r.samples, m, r.wall_s)
        for n in ns:
            s = settings(args, n)
            urls = write_url_list(work / f"urls-{n}" / "urls.parquet", server.base_url,
                                  all_captions[:n])
            runs: dict[str, list[RunResult]] = {t: [] for t in tools}
            for rnd in range(args.repeats):
                order = tools if rnd % 2 == 0 else list(reversed(tools))
                for tool in order:
                    out = work / f"out-{tool}"
                    r = measure(tool, command(tool, urls, out, s), out, server,
                                work / f"{tool}-{n}-{rnd}.log", args.run_timeout)
                    log.info("N=%d round %d %s: %d samples in %.2fs (%.1f img/s, peak RSS "
                             "%.0f MiB, PSS %.0f MiB)", n, rnd, tool, r.samples, r.wall_s,
                             r.img_per_s, r.peak_rss / 2**20, r.peak_pss / 2**20)
                    runs[tool].append(r)
            all_runs[n] = runs
            results[n] = {t: median_run(rs) for t, rs in runs.items()}
        slow_runs: dict[str, RunResult] = {}
        if slow:
            n = min(ns)
            urls = write_url_list(work / f"urls-slow-{n}" / "urls.parquet", server.base_url,
                                  all_captions[:n], slow)
            for tool in tools:
                out = work / f"out-{tool}"
                r = measure(tool, command(tool, urls, out, settings(args, n)), out, server,
                            work / f"{tool}-{n}-slow.log", args.run_timeout)
                log.info("N=%d with stragglers %s: %d samples in %.2fs (%.1f img/s)", n, tool,
                         r.samples, r.wall_s, r.img_per_s)
                slow_runs[tool] = r
        base_url = server.base_url
    if limit is not None:
        print()
        print(f"per-core limit (decode {args.size}² JPEG -> resize {args.image_size} -> encode "
              f"q{args.encode_quality}, bytes in memory, no I/O), measured in this run: "
              + ", ".join(f"{lib} {rate:.0f}" for lib, rate in limit.per_library.items())
              + f" img/s alone in one process; fastest ({limit.library}) in {limit.cores} "
              f"processes at once: {limit.per_core:.0f} img/s per core, {limit.total:.0f} img/s "
              f"for {limit.cores} core(s)")
    for n in ns:
        s = settings(args, n)
        best = results[n]
        print()
        print(f"perf-ingest: N={n} {kind} JPEGs {args.size}x{args.size} q90 via "
              f"{base_url or 'loopback'} -> {s.image_size}px {s.resize_mode} q"
              f"{s.encode_quality}; {s.processes} processes x {s.threads} threads; "
              f"{s.samples_per_shard} samples/shard; ours on FnApiRunner {s.running_mode}; "
              f"warm-up {min(args.warmup, max(ns))} images per tool, then {args.repeats} "
              f"round(s) alternating order; median run shown")
        print(table(list(best.values()), n))
        if limit is not None:
            for tool, r in best.items():
                if r.active_img_per_s:
                    print(f"{tool}: active phase {r.active_img_per_s:.0f} img/s = "
                          f"{r.active_img_per_s / limit.total:.0%} of the per-core limit x "
                          f"{limit.cores} core(s) ({limit.total:.0f} img/s)")
        for tool, rs in all_runs[n].items():
            for i, r in enumerate(rs):
                if r.rc != 0 or r.samples != n or r.failures:
                    print(f"WARNING: {tool} N={n} run {i} wrote {r.samples}/{n} samples (rc "
                          f"{r.rc}); failures {r.failures or 'none recorded'}; log {r.log}")
        r = ratio(best)
        if r is not None and len(ns) > 1:
            print(f"ratio N={n}: {r:.2f}")
    if slow_runs:
        n = min(ns)
        print()
        print(f"perf-ingest with stragglers: N={n}, as above, but {slow[0]:.0%} of the URLs "
              f"(every {straggler_every(slow[0])}th) answer after {slow[1]:g} s; one round each")
        print(table(list(slow_runs.values()), n))
        r = ratio(slow_runs)
        if r is not None:
            print(f"ratio N={n} with stragglers: {r:.2f}")
    print()
    print("wall = whole command incl. interpreter/runner start-up; startup = command start -> "
          "first request at the server; active = first request -> last shard tar written (tail = "
          "the part after the last request); "
          "img/s = samples in the tars / wall s; cpu s = user+sys of the tool's process tree; "
          "server cpu s = the (shared) server's CPU meanwhile; peak RSS / PSS = sum over the "
          "process tree, sampled every 0.1 s (RSS charges a forked worker again for the pages "
          "it shares with its parent; PSS splits them; PSS every 0.5 s)")
    benchmark.all_ok = all(  # type: ignore[attr-defined]
        r.rc == 0 and r.samples == n for n, best in results.items() for r in best.values()) \
        and all(r.rc == 0 and r.samples == min(ns) for r in slow_runs.values())
    return results[ns[-1]]


def ratio(best: dict[str, RunResult]) -> float | None:
    """Ours ÷ img2dataset in images/s (whole command), when both ran and wrote something."""
    if "ours" not in best or "img2dataset" not in best or best["img2dataset"].img_per_s <= 0:
        return None
    return best["ours"].img_per_s / best["img2dataset"].img_per_s


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args._ours:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: "
                            "%(message)s")
        stats = run_ours(args.url_list, args.output, settings(args, 1))
        print(json.dumps({k: stats[k] for k in ("input", "kept", "rejected", "shards")}))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    best = benchmark(args)
    r = ratio(best)
    if r is not None:
        print(f"ratio {r:.2f}")
    return 0 if getattr(benchmark, "all_ok", False) else 1


if __name__ == "__main__":
    sys.exit(main())
