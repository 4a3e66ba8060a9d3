"""The recipe kit: what every corpus recipe shares, so a recipe holds only what is its own.

A recipe is one or more **heads** (a subset's source and its own stages: keywords and fetch for
PUB11, georeferencing and captioning for RS3, Box-to-Caption for RemoteCLIP, tiling for
SkyScript, a captioned folder for ``local``) followed by the **shared tail** and one sink::

    head(pub11) ─┐
    head(rs3)   ─┼─ [content dedup across subsets] → [embed] → [CLIP filter] → [decontaminate]
    head(local) ─┘     → [semantic dedup] → WriteBuild (per-subset files + merged documents)

The pieces:

* :class:`Branch` carries a subset's records through its stages and **gathers every reject
  and duplicate output as stages are applied** (``branch.apply(label, transform)``), so no
  stage output can be left out of the accounting. Every stage honours one output contract:
  records go on under ``records`` (:data:`pipelines.records.MAIN`), reject rows under
  ``rejects``, duplicate rows under ``duplicates``; a stage output with any other tag is an
  error at construction time.
* :class:`Head`: a subset's source, stages and flags (subclass it; see ``rs5m.Pub11``).
* :class:`SharedTail`: the tail as one PTransform, ending in the sink.
* :class:`Recipe` + :func:`run`: the Beam entry point (``run(argv)``: our flags, then Beam's,
  which pass through), ``--help`` listing both, clearing an earlier build of the subsets being
  built, the manifest, and the closing reports.

**Several subsets in one build.** ``--subsets a,b`` picks the heads to build (default: every
head whose input is given). Content dedup, semantic dedup and decontamination run across the
subsets built together. **Which copy survives across subsets:** the one in the subset whose
captions are the most trustworthy, by the heads' ``priority`` (:data:`PRIORITY_OWN` your own
captioned data, then :data:`PRIORITY_ARCHIVE` curated archives and caption sets, then
:data:`PRIORITY_WEB` web alt text); within a subset, the stage's own rule (pixels, bytes, key
for content dedup; ``clip_score``, key for semantic dedup). Dedup across subsets holds for the
subsets built together: a subset rebuilt alone is deduplicated within itself only.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import (
    PipelineOptions,
    SetupOptions,
    StandardOptions,
    TestOptions,
)
from apache_beam.pvalue import DoOutputsTuple, PCollection

import schemas
from pipelines.records import DUPLICATES, MAIN, REJECTS, reject_row
from pipelines.sinks.shards import WriteBuild, clear_previous, join, read_json
from pipelines.stages.dedup import DEFAULT_MAX_HAMMING

log = logging.getLogger("pipelines.recipes")

#: cross-subset survivor priority of a head (lower wins)
PRIORITY_OWN = 0
PRIORITY_ARCHIVE = 1
PRIORITY_WEB = 2
#: the working field that carries a record's subset priority into the dedup stages
SUBSET_RANK = "_subset_rank"
_OUTPUT_TAGS = (MAIN, REJECTS, DUPLICATES)


def as_bool(v: str | bool) -> bool:
    """argparse ``type=`` for ``--flag=true|false`` (Beam's and img2dataset's spelling)."""
    if isinstance(v, bool):
        return v
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {v!r}")


# ----------------------------------------------------------------------------- branches


def stage_outputs(out: Any, label: str) -> dict[str, PCollection]:
    """A stage's outputs as ``{tag: PCollection}`` under the one output contract.

    Accepts a PCollection (records only), a ``DoOutputsTuple`` (``with_outputs``) or a dict;
    raises for a tag outside ``records``/``rejects``/``duplicates``, so a stage whose outputs
    the kit does not know cannot lose records silently."""
    if isinstance(out, PCollection):
        return {MAIN: out}
    if isinstance(out, DoOutputsTuple):
        tags = [out._main_tag, *out._tags]  # Beam has no public tag list
        outs = {MAIN if t == out._main_tag else t: out[t] for t in tags}
    elif isinstance(out, dict):
        outs = dict(out)
    else:
        raise TypeError(f"stage {label} returned {type(out).__name__}, not PCollection(s)")
    unknown = sorted(set(outs) - set(_OUTPUT_TAGS))
    if unknown or MAIN not in outs:
        raise ValueError(
            f"stage {label} has outputs {sorted(outs)}; the contract is {list(_OUTPUT_TAGS)} "
            f"with {MAIN!r} required (unknown: {unknown})")
    return outs


class Branch:
    """A subset's records on their way through its stages, plus everything they shed.

    >>> b = Branch.read(p, "pub11", "Read", ReadLaionParquet(glob))     # doctest: +SKIP
    >>> b.apply("Keywords", keyword_filter).apply("Fetch", Fetch(cfg))  # doctest: +SKIP
    >>> b.outputs()      # {"inputs", "records", "rejects", "duplicates"}  # doctest: +SKIP
    """

    def __init__(self, subset: str, records: PCollection, inputs: PCollection,
                 rejects: Sequence[PCollection] = (), duplicates: Sequence[PCollection] = ()):
        self.subset = subset
        self.records = records
        self.inputs = inputs
        self.rejects = list(rejects)
        self.duplicates = list(duplicates)
        self.stages: list[str] = []

    @classmethod
    def read(cls, p: beam.Pipeline, subset: str, label: str, source: beam.PTransform
             ) -> Branch:
        """Start a branch from a source: its records, and its unusable rows as rejects. The
        source's outputs, both, are the subset's input (what the accounting counts)."""
        outs = stage_outputs(p | f"{label}[{subset}]" >> source, label)
        records = outs[MAIN]
        rejects = [outs[REJECTS]] if REJECTS in outs else []
        duplicates = [outs[DUPLICATES]] if DUPLICATES in outs else []
        shed = rejects + duplicates
        inputs = ([records, *shed] | f"Inputs[{subset}]" >> beam.Flatten()) if shed else records
        b = cls(subset, records, inputs, rejects, duplicates)
        b.stages.append(label)
        return b

    def apply(self, label: str, transform: beam.PTransform) -> Branch:
        """``records | transform``; its rejects and duplicates join the branch's."""
        outs = stage_outputs(self.records | f"{label}[{self.subset}]" >> transform, label)
        self.records = outs[MAIN]
        if REJECTS in outs:
            self.rejects.append(outs[REJECTS])
        if DUPLICATES in outs:
            self.duplicates.append(outs[DUPLICATES])
        self.stages.append(label)
        return self

    def apply_fn(self, label: str, fn: Callable[[dict[str, Any]], Any]) -> Branch:
        """A pure stage ``record -> record | Reject`` (a ``Reject`` becomes its reject row)."""
        return self.apply(label, beam.FlatMap(route(fn)).with_outputs(REJECTS, main=MAIN))

    def _flat(self, pcolls: list[PCollection], what: str) -> PCollection:
        p = self.inputs.pipeline
        if not pcolls:
            return p | f"No{what}[{self.subset}]" >> beam.Create([])
        return pcolls | f"All{what}[{self.subset}]" >> beam.Flatten()

    def outputs(self) -> dict[str, PCollection]:
        return {"inputs": self.inputs, "records": self.records,
                "rejects": self._flat(self.rejects, "Rejects"),
                "duplicates": self._flat(self.duplicates, "Duplicates")}


def route(fn: Callable[[dict[str, Any]], Any]):
    """A pure stage ``record -> record | Reject`` as a FlatMap body with a ``rejects`` output."""

    def apply(record):
        out = fn(record)
        if isinstance(out, dict):
            yield out
        else:
            yield beam.pvalue.TaggedOutput(REJECTS, reject_row(record, out))

    return apply


# ----------------------------------------------------------------------------- heads


class Head:
    """A subset's own part of a recipe: flags, source and stages. Subclass and override."""

    #: the subset name (``shards/{subset}-*.tar``); a head may let a flag rename it
    subset: str = ""
    #: one line for ``--help`` and the logs
    title: str = ""
    #: cross-subset survivor priority (``PRIORITY_*``; lower wins)
    priority: int = PRIORITY_WEB
    #: whether the head removes exact/near-exact copies itself; if not, the tail does
    dedups_content: bool = False
    #: the caption kinds the head writes (``schemas.CAPTION_KINDS``)
    caption_kinds: tuple[str, ...] = ()

    def add_flags(self, parser: argparse.ArgumentParser) -> None:
        """Add this head's flags (in its own argument group)."""

    def subset_name(self, cfg: dict[str, Any]) -> str:
        return self.subset

    def given(self, cfg: dict[str, Any]) -> bool:
        """Whether the flags name this head's input (then it is built by default)."""
        return False

    def defaults(self, cfg: dict[str, Any]) -> None:
        """Fill shared defaults from this head's flags (e.g. the CLIP model from the RS
        filter's); runs for every head of the recipe, built or not."""

    def resolve(self, cfg: dict[str, Any]) -> None:
        """Check this head's flags; SystemExit on an unusable setup. Runs only for the heads
        being built."""

    def expand(self, p: beam.Pipeline, cfg: dict[str, Any]) -> Branch:
        raise NotImplementedError


# ----------------------------------------------------------------------------- shared flags


def add_shared_flags(parser: argparse.ArgumentParser, default_output: str) -> None:
    """The flags every recipe has: output and subsets, fetch, images, dedup, models,
    embeddings, CLIP filter, semantic dedup, decontamination, sink."""
    from pipelines.stages.fetch import FetchConfig

    g = parser.add_argument_group("build")
    g.add_argument("--output", default=default_output,
                   help="build folder (local, gs://, s3://; default %(default)s)")
    g.add_argument("--subsets", help="comma-separated subsets to build (default: every subset "
                   "whose input is given); the others already in OUTPUT are kept")
    g.add_argument("--worker_start_timeout", type=float, default=60.0,
                   help="seconds an EXTERNAL worker pool's worker has to start and connect, "
                   "checked before a job this process runs (PortableRunner with "
                   "--job_endpoint=embed, DirectRunner); 0 skips the check (default "
                   "%(default)s)")
    g = parser.add_argument_group("fetch and file reads (img2dataset-style)")
    g.add_argument("--timeout", type=float, default=10.0,
                   help="seconds per connect and per socket read (default %(default)s)")
    g.add_argument("--fetch_deadline", type=float, default=FetchConfig.deadline,
                   help="wall-clock seconds per fetch, all attempts, redirects and the body "
                   "included (default %(default)s)")
    g.add_argument("--retries", type=int, default=2)
    g.add_argument("--max_bytes", type=int, default=20 * 2**20,
                   help="byte cap per image (default 20 MiB)")
    g.add_argument("--fetch_user_agent", default=FetchConfig.user_agent,
                   help="the User-Agent header of our requests")
    g.add_argument("--respect_noai", type=as_bool, default=True,
                   help="honour X-Robots-Tag noai/noimageai (default true)")
    g.add_argument("--thread_count", type=int, default=64,
                   help="requests in flight per worker (per fetch process)")
    g.add_argument("--fetch_processes", type=_processes, default="auto",
                   help="forked processes that fetch and decode for each worker, each with "
                   "--thread_count threads, outside the worker's GIL. auto (default): the "
                   "cores this process may use when the job runs on the local in-memory "
                   "runner (DirectRunner), whose one worker would otherwise be GIL-bound "
                   "at about one core; 1 on every other runner, whose workers already fill "
                   "the cores")
    g.add_argument("--allow_networks",
                   help="comma-separated CIDRs exempt from the address guard (e.g. "
                   "127.0.0.0/8 for a local test server); default none")
    g.add_argument("--address_guard", type=as_bool, default=True,
                   help="refuse loopback, private, link-local and metadata addresses, at "
                   "connect time and after every redirect (default true)")
    g.add_argument("--allow_path_prefixes",
                   help="comma-separated folders or bucket prefixes that web rows may name as "
                   "their image (default none: web rows are fetched over http(s) only)")
    g = parser.add_argument_group("images (img2dataset-style)")
    g.add_argument("--image_size", type=int, default=256)
    g.add_argument("--resize_mode", default="border",
                   choices=["no", "keep_ratio", "center_crop", "border"])
    g.add_argument("--resize_only_if_bigger", type=as_bool, default=False)
    g.add_argument("--min_image_size", type=int, default=64)
    g.add_argument("--max_aspect_ratio", type=float,
                   help="reject images more elongated than this (default: ImageConfig's)")
    g.add_argument("--encode_quality", type=int, default=95)
    g = parser.add_argument_group("dedup")
    g.add_argument("--dedup", type=as_bool, default=True,
                   help="exact (sha256) + near-exact (pHash) dedup across the corpus")
    g.add_argument("--phash_hamming", type=int, default=DEFAULT_MAX_HAMMING,
                   help="max pHash Hamming distance of two copies of one image")
    g.add_argument("--dedup_crops", type=as_bool, default=True,
                   help="also match centre-cropped copies (by 2.5-10%% a side) through "
                        "the pHashes of centre crops, in dedup and in decontamination; "
                        "false: the full-picture pHash only (saves ~1 ms an image)")
    g = parser.add_argument_group("models")
    g.add_argument("--device", help="cuda or cpu for RunInference models (default: cuda when "
                   "present)")
    g.add_argument("--accelerator", help="Beam accelerator resource hint put on the model "
                   "stages only (captioning, rotation pick, RS filter, embeddings), e.g. "
                   "'type:nvidia-l4;count:1;install-nvidia-driver' on Dataflow: the other "
                   "stages run on CPU workers (default none)")
    g = parser.add_argument_group("CLIP embeddings (image + caption, clip_score)")
    g.add_argument("--embed", type=as_bool, default=True,
                   help="embed images and captions; puts clip_score on every row")
    g.add_argument("--clip_model", help="open_clip architecture or model directory (local, "
                   "gs://, s3://)")
    g.add_argument("--clip_pretrained", help="checkpoint for --clip_model (local, gs://, s3://)")
    g.add_argument("--clip_precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="bf16/fp16 are for GPU workers")
    g.add_argument("--clip_batch_size", type=int, default=32)
    g.add_argument("--embeddings_dir", help="write clip-retrieval's embeddings folder here")
    g.add_argument("--write_embeddings", type=as_bool, default=False,
                   help="write the embeddings folder to OUTPUT/embeddings")
    g = parser.add_argument_group("CLIP-score filter")
    g.add_argument("--clip_threshold", type=float,
                   help="reject clip_score below this (LAION: 0.28 with ViT-B/32)")
    g.add_argument("--clip_top_percent", type=float,
                   help="keep the top P%% per source by clip_score (DataComp/SkyScript)")
    g = parser.add_argument_group("semantic dedup (SemDeDup)")
    g.add_argument("--semdedup", type=as_bool, default=False)
    g.add_argument("--semdedup_eps", type=float, default=0.05,
                   help="drop cosine >= 1 - eps (default %(default)s; a random-weight model "
                   "puts distinct images at cosine 0.999+ and needs ~0.0002)")
    g.add_argument("--semdedup_cluster_size", type=int, default=1000)
    g.add_argument("--semdedup_max_cluster", type=int, default=5000)
    g.add_argument("--semdedup_sample", type=int, default=50_000)
    g.add_argument("--semdedup_margin", type=float, default=0.1)
    g.add_argument("--semdedup_seed", type=int, default=0)
    g = parser.add_argument_group("test-set decontamination")
    g.add_argument("--decontam", action="append",
                   help="benchmark as name=path (class folders, or caption JSON[::images]); "
                   "repeat or comma-separate")
    g.add_argument("--decontam_hamming", type=int, default=4,
                   help="max pHash Hamming distance to a benchmark image")
    g.add_argument("--decontam_cosine", type=float, default=0.95,
                   help="min embedding cosine to a benchmark image (default %(default)s; "
                   "needs --embed)")
    g = parser.add_argument_group("sink")
    g.add_argument("--samples_per_shard", type=int, default=10_000)


#: the stages that run a model on every record: the ones ``--accelerator`` places on GPUs
MODEL_STAGES = ("Caption", "RotationPick", "RSFilter", "Embed")


def on_accelerator(transform: beam.PTransform, cfg: dict[str, Any]) -> beam.PTransform:
    """``transform`` with the ``--accelerator`` resource hint, when one is given.

    Only the model stages (:data:`MODEL_STAGES`) carry it, so a runner that fits workers to
    hints (Dataflow's right fitting) gives GPUs to them alone; the fetch, decode, dedup and
    sink stages stay on CPU workers. The decontamination stage's benchmark embedding (a few
    thousand images) stays on CPU."""
    if cfg.get("accelerator"):
        return transform.with_resource_hints(accelerator=cfg["accelerator"])
    return transform


def _processes(value: str) -> int | str:
    """``--fetch_processes``: ``auto`` or a positive count."""
    if value.strip().lower() == "auto":
        return "auto"
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"'auto' or a positive count, not {value!r}")
    return n


#: what ``--runner DirectRunner`` (and no ``--runner``) runs: Beam's FnApiRunner (below)
LOCAL_RUNNER = "FnApiRunner"


def runner_of(opts: PipelineOptions) -> str:
    """The runner a job with ``opts`` runs on, by name.

    ``DirectRunner`` (and no ``--runner``) means Beam's FnApiRunner, which DirectRunner has
    always picked for batch jobs like ours, and which this project's tests, figures and
    determinism checks run on. Since Beam 2.6x, DirectRunner first tries the Prism runner,
    downloading a Go binary from GitHub on first use: on a machine with network access the
    build would silently move to another runner, and offline (or behind a firewall that drops
    the request) it waits for that download to fail on every build. Name ``PrismRunner`` to
    run on Prism."""
    runner = opts.view_as(StandardOptions).runner or "DirectRunner"
    name = runner if isinstance(runner, str) else type(runner).__name__
    return LOCAL_RUNNER if name in ("DirectRunner", "SwitchingDirectRunner") else name


def fetch_processes(value: int | str, opts: PipelineOptions) -> tuple[int, str]:
    """(fetch processes, why) for ``--fetch_processes value`` on the job of ``opts``.

    ``auto`` is the usable cores when the job runs on the in-memory FnApiRunner with one
    worker (DirectRunner's default): everything then runs in this process under one GIL,
    and the fetch and decode work (most of a web build's CPU) can fill the other cores only
    from processes of its own. On any other runner or mode the runner's workers are the
    processes (Dataflow, Flink, Spark, Prism; DirectRunner's multi_processing), and ``auto``
    is 1."""
    from apache_beam.options.pipeline_options import DirectOptions, PortableOptions

    from pipelines.image_guard import core_count

    if value != "auto":
        return int(value), "as given"
    direct = opts.view_as(DirectOptions)
    environment = (opts.view_as(PortableOptions).environment_type or "").upper()
    if runner_of(opts) != LOCAL_RUNNER:
        return 1, f"auto: the {runner_of(opts)} workers are the processes"
    if (direct.direct_running_mode or "in_memory") != "in_memory" \
            or (direct.direct_num_workers or 1) != 1 or environment not in ("", "EMBEDDED"):
        return 1, "auto: the runner's workers are the processes"
    cores = core_count()
    return cores, f"auto: the in-memory runner's one worker, {cores} usable core(s)"


def _csv(value: str | None) -> tuple[str, ...]:
    return tuple(x.strip() for x in (value or "").split(",") if x.strip())


def fetch_config(cfg: dict[str, Any], allowed_prefixes: Sequence[str] = ()) -> Any:
    """The fetch settings of the shared flags (``allowed_prefixes`` added to the flag's)."""
    from pipelines.stages.fetch import FetchConfig

    return FetchConfig(
        timeout=cfg["timeout"],
        deadline=cfg["fetch_deadline"],
        retries=cfg["retries"],
        max_bytes=cfg["max_bytes"],
        user_agent=cfg["fetch_user_agent"],
        respect_noai=cfg["respect_noai"],
        threads=cfg["thread_count"],
        processes=cfg["fetch_processes"],
        allow_networks=_csv(cfg.get("allow_networks")),
        address_guard=cfg["address_guard"],
        allowed_prefixes=_csv(cfg.get("allow_path_prefixes")) + tuple(allowed_prefixes),
    )


def image_config(cfg: dict[str, Any]) -> Any:
    """The image settings of the shared flags."""
    from pipelines.stages.images import ImageConfig

    extra = {}
    if cfg.get("max_aspect_ratio") is not None:
        extra["max_aspect_ratio"] = cfg["max_aspect_ratio"]
    return ImageConfig(
        image_size=cfg["image_size"],
        resize_mode=cfg["resize_mode"],
        resize_only_if_bigger=cfg["resize_only_if_bigger"],
        min_image_size=cfg["min_image_size"],
        encode_quality=cfg["encode_quality"],
        crop_hashes=cfg["dedup_crops"],
        **extra,
    )


# ----------------------------------------------------------------------------- the tail


class SharedTail(beam.PTransform):
    """Every subset's records, together → [content dedup] → [embed] → [CLIP filter] →
    [decontaminate] → [semantic dedup] → the sink. Stages whose flags are off are left out.

    Input: ``{"inputs", "records", "rejects", "duplicates"}`` (every subset, flattened, each
    record with its ``_subset_rank``). Output: the merged stats document.
    """

    def __init__(self, cfg: dict[str, Any], recipe: str, subsets: Sequence[str],
                 manifest: dict[str, Any], content_dedup: bool):
        super().__init__()
        self.cfg = cfg
        self.recipe = recipe
        self.subsets = list(subsets)
        self.manifest = manifest
        self.content_dedup = content_dedup

    def expand(self, pcolls):
        cfg = self.cfg
        b = Branch("tail", pcolls["records"], pcolls["inputs"], [pcolls["rejects"]],
                   [pcolls["duplicates"]])
        if self.content_dedup and cfg["dedup"]:
            from pipelines.stages.dedup import DedupByContent

            b.apply("Dedup", DedupByContent(cfg["phash_hamming"], crops=cfg["dedup_crops"]))
        if cfg["embed"]:
            from pipelines.stages.embed import Embed

            b.apply("Embed", on_accelerator(Embed(
                cfg["clip_model"], cfg.get("clip_pretrained"), device=cfg.get("device"),
                precision=cfg["clip_precision"], batch_size=cfg["clip_batch_size"]), cfg))
        else:
            b.apply("NoEmbed", beam.Map(lambda r: {**r, "clip_score": None}))
        if cfg.get("clip_threshold") is not None or cfg.get("clip_top_percent") is not None:
            from pipelines.stages.clip_filter import ClipScoreFilter

            b.apply("ClipFilter", ClipScoreFilter(cfg.get("clip_threshold"),
                                                  cfg.get("clip_top_percent")))
        specs = _decontam_specs(cfg)
        if specs:
            from pipelines.stages.decontam import Decontaminate

            embedder = None
            if cfg["embed"]:
                from pipelines.models.handlers import OpenClipImageEmbedder

                embedder = OpenClipImageEmbedder(cfg["clip_model"], cfg.get("clip_pretrained"),
                                                 device=cfg.get("device"),
                                                 precision=cfg["clip_precision"],
                                                 batch_size=cfg["clip_batch_size"])
            b.apply("Decontaminate", Decontaminate(
                specs, image_config(cfg), embedder, max_hamming=cfg["decontam_hamming"],
                min_cosine=cfg["decontam_cosine"]))
        if cfg["semdedup"]:
            from pipelines.stages.semdedup import SemanticDedup, SemDedupConfig

            b.apply("SemanticDedup", SemanticDedup(SemDedupConfig(
                eps=cfg["semdedup_eps"], cluster_size=cfg["semdedup_cluster_size"],
                max_cluster=cfg["semdedup_max_cluster"], sample_size=cfg["semdedup_sample"],
                margin=cfg["semdedup_margin"], seed=cfg["semdedup_seed"])))
        out = b.outputs()
        return {"inputs": out["inputs"], "kept": out["records"], "rejects": out["rejects"],
                "duplicates": out["duplicates"]} | "Write" >> WriteBuild(
            cfg["output"], self.recipe, self.subsets, self.manifest, cfg["samples_per_shard"],
            cfg.get("embeddings_dir"))


def _decontam_specs(cfg: dict[str, Any]) -> list[tuple[str, str]]:
    from pipelines.stages.decontam import parse_specs

    return parse_specs(cfg.get("decontam"))


# ----------------------------------------------------------------------------- recipes


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def git_revision() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(
            ["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


@dataclasses.dataclass
class Recipe:
    """A corpus recipe: its heads (one per subset it can build) and where it writes."""

    name: str
    description: str
    heads: list[Head]
    default_output: str

    def parser(self) -> argparse.ArgumentParser:
        ap = argparse.ArgumentParser(
            prog=f"python -m pipelines.recipes.{self.name}", description=self.description,
            usage=f"python -m pipelines.recipes.{self.name} [--flag VALUE ...] "
                  "[Beam pipeline options ...]",
            formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False,
            allow_abbrev=False)
        ap.add_argument("-h", "--help", action=_HelpAction, recipe=self,
                        help="show our flags and Beam's, then exit")
        for head in self.heads:
            head.add_flags(ap)
        add_shared_flags(ap, self.default_output)
        return ap

    def run(self, argv: Sequence[str] | None = None) -> Any:
        """Build as ``argv`` says (``--help`` lists the flags): :func:`run`. A recipe module
        exports it as its ``run``."""
        return run(self, argv)

    def main(self) -> None:
        """The command line (``python -m pipelines.recipes.<name>``): :func:`main`."""
        main(self)

    def manifest(self, cfg: dict[str, Any], runner: str, subsets: Sequence[str]
                 ) -> dict[str, Any]:
        return {
            "recipe": self.name,
            "built_subsets": list(subsets),
            "schema_version": schemas.SCHEMA_VERSION,
            "config": {k: v for k, v in sorted(cfg.items()) if v is not None},
            "runner": runner,
            "git_revision": git_revision(),
            "python": platform.python_version(),
            "versions": {
                d: _version(d)
                for d in ("rs-corpus", "apache-beam", "pyarrow", "pillow", "torch",
                          "open_clip_torch")
            },
        }


def _beam_parser() -> argparse.ArgumentParser:
    from apache_beam.options.pipeline_options import _BeamArgumentParser

    bp = _BeamArgumentParser(allow_abbrev=False, add_help=False)
    for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
        cls._add_argparse_args(bp)  # how Beam itself builds its parser
    return bp


class _HelpAction(argparse.Action):
    def __init__(self, option_strings, dest, recipe: Recipe, **kw):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)
        self.recipe = recipe

    def __call__(self, parser, namespace, values, option_string=None):
        text = parser.format_help()
        beam_help = _beam_parser().format_help()
        _, _, options = beam_help.partition("options:")
        print(text)
        print("Beam pipeline options (passed through to the runner):" + options)
        parser.exit()


def select(recipe: Recipe, cfg: dict[str, Any]) -> list[Head]:
    """The heads to build: ``--subsets``, or every head whose input is given."""
    names = {h.subset_name(cfg): h for h in recipe.heads}
    if cfg.get("subsets"):
        wanted = [s.strip() for s in cfg["subsets"].split(",") if s.strip()]
        unknown = [s for s in wanted if s not in names]
        if unknown:
            raise SystemExit(f"{recipe.name}: unknown subsets {unknown}; this recipe builds "
                             f"{sorted(names)}")
        missing = [s for s in wanted if not names[s].given(cfg)]
        if missing:
            raise SystemExit(f"{recipe.name}: subsets {missing} were asked for but their "
                             "input flags are not given (see --help)")
        return [names[s] for s in wanted]
    heads = [h for h in recipe.heads if h.given(cfg)]
    if not heads:
        raise SystemExit(f"{recipe.name}: no input given; "
                         + "; ".join(f"{h.subset_name(cfg)}: {h.title}" for h in recipe.heads)
                         + " (see --help)")
    return heads


def resolve(recipe: Recipe, cfg: dict[str, Any]) -> list[Head]:
    """Check the flags, fill the defaults that depend on others; the heads to build."""
    for h in recipe.heads:
        h.defaults(cfg)
    heads = select(recipe, cfg)
    for h in heads:
        h.resolve(cfg)
    if cfg.get("write_embeddings") and not cfg.get("embeddings_dir"):
        cfg["embeddings_dir"] = join(cfg["output"], "embeddings")
    needs_embed = [f for f in ("clip_threshold", "clip_top_percent", "embeddings_dir")
                   if cfg.get(f) is not None] + (["semdedup"] if cfg.get("semdedup") else [])
    if cfg["embed"] and not cfg.get("clip_model"):
        raise SystemExit(f"{recipe.name}: --embed needs --clip_model, or --embed=false")
    if needs_embed and not cfg["embed"]:
        raise SystemExit(
            f"{recipe.name}: {', '.join('--' + f for f in needs_embed)} need --embed")
    return heads


def compose(p: beam.Pipeline, recipe: Recipe, heads: Sequence[Head], cfg: dict[str, Any],
            runner: str = "DirectRunner") -> PCollection:
    """The whole build on ``p``: every head, the shared tail, the sink. Returns the merged
    stats document's PCollection."""
    subsets = [h.subset_name(cfg) for h in heads]
    branches = [h.expand(p, cfg) for h in heads]
    outs = []
    for head, branch in zip(heads, branches, strict=True):
        if branch.subset != head.subset_name(cfg):
            raise ValueError(f"head {head.subset_name(cfg)} built a branch of {branch.subset}")
        o = branch.outputs()
        rank = head.priority
        o["records"] = o["records"] | f"Rank[{branch.subset}]" >> beam.Map(
            lambda r, rank=rank: {**r, SUBSET_RANK: rank})
        outs.append(o)

    def together(name: str) -> PCollection:
        if len(outs) == 1:
            return outs[0][name]
        return [o[name] for o in outs] | f"Together[{name}]" >> beam.Flatten()

    content_dedup = len(heads) > 1 or not all(h.dedups_content for h in heads)
    manifest = recipe.manifest(cfg, runner, subsets)
    manifest["heads"] = {
        h.subset_name(cfg): {"title": h.title, "priority": h.priority,
                             "caption_kinds": list(h.caption_kinds), "stages": b.stages}
        for h, b in zip(heads, branches, strict=True)}
    return {name: together(name) for name in ("inputs", "records", "rejects", "duplicates")} \
        | "Tail" >> SharedTail(cfg, recipe.name, subsets, manifest, content_dedup)


def parse(recipe: Recipe, argv: Sequence[str] | None) -> tuple[dict[str, Any], list[str]]:
    """(our config, Beam's flags). An unknown flag is an error, not silently dropped;
    ``--fetch_processes auto`` becomes its count for the runner the Beam flags name."""
    parser = recipe.parser()
    args, rest = parser.parse_known_args(list(argv or []))
    _, unknown = _beam_parser().parse_known_args(rest)
    if unknown:
        parser.error(f"unknown flags {unknown} (neither {recipe.name}'s nor Beam's; see --help)")
    cfg = vars(args)
    cfg["fetch_processes"], why = fetch_processes(cfg["fetch_processes"], PipelineOptions(rest))
    log.info("%s: fetch in %d process(es) x %d threads (%s)", recipe.name,
             cfg["fetch_processes"], cfg["thread_count"], why)
    return cfg, rest


def run(recipe: Recipe, argv: Sequence[str] | None = None) -> Any:
    """Build ``recipe`` as ``argv`` says. Returns the merged ``stats.json`` document; on a
    ``--dry_run=True`` translation, the names of the pipeline's transforms instead."""
    cfg, beam_args = parse(recipe, argv)
    heads = resolve(recipe, cfg)
    subsets = [h.subset_name(cfg) for h in heads]
    opts = PipelineOptions(beam_args)
    # our DoFns reference module-level code: nothing of the main session needs pickling
    opts.view_as(SetupOptions).save_main_session = False
    runner = runner_of(opts)
    opts.view_as(StandardOptions).runner = runner
    dry_run = bool(opts.view_as(TestOptions).dry_run)
    if not dry_run:
        from pipelines.worker_pool import check_external_environment

        # before anything is cleared: a pool whose workers cannot start would leave Beam's
        # job service waiting for them forever
        check_external_environment(opts, cfg["worker_start_timeout"])
        cleared = clear_previous(cfg["output"], subsets, cfg.get("embeddings_dir"))
        if cleared:
            log.info("%s: removed %d files of an earlier build of %s", recipe.name,
                     len(cleared), ", ".join(subsets))
    log.info("%s: building %s into %s on %s", recipe.name, ", ".join(subsets), cfg["output"],
             runner)
    p = beam.Pipeline(options=opts)
    compose(p, recipe, heads, cfg, runner)
    result = p.run()
    result.wait_until_finish()
    if dry_run:
        log.info("dry run: the pipeline translated; nothing was submitted")
        proto = p.to_runner_api()
        return sorted(t.unique_name for t in proto.components.transforms.values())
    stats = read_json(join(cfg["output"], "stats.json"))
    from pipelines import stats as stats_report

    print(stats_report.report(cfg["output"]))
    specs = _decontam_specs(cfg)
    if specs:
        from pipelines.stages import decontam

        print(decontam.report(cfg["output"], specs))
    return stats


def main(recipe: Recipe, argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # our progress at INFO; Beam's and open_clip's chatter (root logger) only when it matters
    for name in ("rs5m", "pipelines"):
        logging.getLogger(name).setLevel(logging.INFO)
    run(recipe, sys.argv[1:] if argv is None else argv)
