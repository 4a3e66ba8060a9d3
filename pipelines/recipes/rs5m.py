"""RS5M, PUB11 subset: remote-sensing pairs mined from LAION-style web parquet.

    read parquet → keyword filter → URL dedup → fetch → decode/normalise → content dedup
    (sha256 + pHash) → RS-image filter (CLIP linear probe, RunInference) → CLIP embeddings
    (image + caption, clip_score; RunInference) → CLIP-score filter → test-set decontamination
    → semantic dedup (SemDeDup) → shards (+ the clip-retrieval embeddings folder, if asked)

Decontamination runs before semantic dedup so that no ``duplicates/`` row points at a sample
removed later. Defaults: embeddings and ``clip_score`` on (cheap with the demo's tiny model);
CLIP-score filter, semantic dedup and decontamination off until their flags are given.

Every input row ends in exactly one of shards/, rejects/ or duplicates/, and the build fails
unless ``input == kept + rejected + duplicates``. Run ``python -m pipelines.recipes.rs5m
--help`` for the flags; Beam's own (``--runner``, ``--project``, ``--temp_location``,
``--direct_num_workers``...) pass through.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
from importlib import metadata
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions, StandardOptions

import schemas
from pipelines.records import DUPLICATES, REJECTS, reject_row
from pipelines.sinks.shards import WriteBuild, join
from pipelines.sources.laion import ColumnMap, ReadLaionParquet
from pipelines.stages.clip_filter import ClipScoreFilter
from pipelines.stages.decontam import Decontaminate, parse_specs
from pipelines.stages.dedup import DEFAULT_MAX_HAMMING, DedupByContent, DedupByUrl
from pipelines.stages.embed import Embed
from pipelines.stages.fetch import Fetch, FetchConfig
from pipelines.stages.images import ImageConfig
from pipelines.stages.keywords import KeywordFilter
from pipelines.stages.rs_filter import RSFilter
from pipelines.stages.semdedup import SemanticDedup, SemDedupConfig

log = logging.getLogger("rs5m")

RECIPE = "rs5m"
SUBSET = "pub11"


def _bool(v: str | bool) -> bool:
    if isinstance(v, bool):
        return v
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {v!r}")


class RS5MOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        g = parser.add_argument_group("input")
        g.add_argument("--input", help="glob(s) of LAION-style parquet, comma-separated")
        g.add_argument("--output", default="out/rs5m", help="output folder (local, gs://, s3://)")
        g.add_argument("--demo_world", help="a demo world folder: default input, models and "
                       "the ground truth the build is scored against")
        g.add_argument("--url_col", help="URL column (default: detect URL/url/image_url...)")
        g.add_argument("--caption_col", help="caption column (default: detect TEXT/caption...)")
        g.add_argument("--id_col", help="id column (default: detect SAMPLE_ID/id/key...)")
        g.add_argument("--source", help="force one source name (default: parent folder name)")
        g.add_argument("--keywords", help="keyword file (default: the bundled RS5M list)")
        g = parser.add_argument_group("fetch (img2dataset-style)")
        g.add_argument("--timeout", type=float,
                       help="seconds per request (default 10; 3 on the demo world)")
        g.add_argument("--retries", type=int, default=2)
        g.add_argument("--max_bytes", type=int,
                       help="byte cap per image (default 20 MiB; 2 MiB on the demo world)")
        g.add_argument("--fetch_user_agent", default=FetchConfig.user_agent,
                       help="the User-Agent header of our requests")
        g.add_argument("--respect_noai", type=_bool, default=True)
        g.add_argument("--thread_count", type=int, default=64,
                       help="requests in flight per worker")
        g = parser.add_argument_group("images (img2dataset-style)")
        g.add_argument("--image_size", type=int, default=256)
        g.add_argument("--resize_mode", default="border",
                       choices=["no", "keep_ratio", "center_crop", "border"])
        g.add_argument("--resize_only_if_bigger", type=_bool, default=False)
        g.add_argument("--min_image_size", type=int, default=64)
        g.add_argument("--max_aspect_ratio", type=float, help="default: no limit")
        g.add_argument("--encode_quality", type=int, default=95)
        g = parser.add_argument_group("dedup")
        g.add_argument("--dedup", type=_bool, default=True,
                       help="exact (sha256) + near-exact (pHash) dedup across the corpus")
        g.add_argument("--phash_hamming", type=int, default=DEFAULT_MAX_HAMMING,
                       help="max pHash Hamming distance of two copies of one image")
        g.add_argument("--dedup_crops", type=_bool, default=True,
                       help="also match centre-cropped copies (by 2.5-10%% a side) through "
                            "the pHashes of centre crops, in dedup and in decontamination; "
                            "false: the full-picture pHash only (saves ~1 ms an image)")
        g = parser.add_argument_group("RS-image filter")
        g.add_argument("--rs_filter", type=_bool, default=True)
        g.add_argument("--rs_model", help="open_clip architecture or local model directory")
        g.add_argument("--rs_pretrained", help="local checkpoint for --rs_model")
        g.add_argument("--rs_probe", help="probe JSON from `python -m pipelines.models.rs_probe"
                       " train` (default: the demo world's)")
        g.add_argument("--rs_threshold", type=float, help="default: the probe's threshold")
        g.add_argument("--device", help="cuda or cpu (default: cuda when present)")
        g = parser.add_argument_group("CLIP embeddings (image + caption, clip_score)")
        g.add_argument("--embed", type=_bool, default=True,
                       help="embed images and captions; puts clip_score on every row")
        g.add_argument("--clip_model", help="open_clip architecture or local model directory "
                       "(default: --rs_model)")
        g.add_argument("--clip_pretrained", help="local checkpoint for --clip_model")
        g.add_argument("--clip_precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                       help="bf16/fp16 are for GPU workers")
        g.add_argument("--clip_batch_size", type=int, default=32)
        g.add_argument("--embeddings_dir", help="write clip-retrieval's embeddings folder here")
        g.add_argument("--write_embeddings", type=_bool, default=False,
                       help="write the embeddings folder to OUTPUT/embeddings")
        g = parser.add_argument_group("CLIP-score filter")
        g.add_argument("--clip_threshold", type=float,
                       help="reject clip_score below this (LAION: 0.28 with ViT-B/32)")
        g.add_argument("--clip_top_percent", type=float,
                       help="keep the top P%% per source by clip_score (DataComp/SkyScript)")
        g = parser.add_argument_group("semantic dedup (SemDeDup)")
        g.add_argument("--semdedup", type=_bool, default=False)
        g.add_argument("--semdedup_eps", type=float,
                       help="drop cosine >= 1 - eps (default 0.05; 0.0002 on the demo world, "
                       "whose random-weight model puts distinct images at cosine 0.999+)")
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
        g.add_argument("--decontam_cosine", type=float,
                       help="min embedding cosine to a benchmark image (default 0.95; 0.9998 "
                       "on the demo world; needs --embed)")
        g = parser.add_argument_group("sink")
        g.add_argument("--samples_per_shard", type=int, default=10_000)


def resolve(opts: RS5MOptions) -> dict[str, Any]:
    """Fill the demo world's defaults and check that the input is usable at all."""
    cfg = {k: v for k, v in opts.get_all_options().items() if k in _OWN_FLAGS}
    demo = cfg.get("demo_world")
    if demo:
        cfg["input"] = cfg.get("input") or join(demo, "pub11", "*", "*.parquet")
        cfg["rs_model"] = cfg.get("rs_model") or join(demo, "models", "tiny-clip")
        cfg["rs_probe"] = cfg.get("rs_probe") or join(demo, "models", "rs_probe.json")
    # the demo's slow rows sleep 5 s: give up well before that
    cfg["timeout"] = cfg.get("timeout") or (3.0 if demo else 10.0)
    cfg["max_bytes"] = cfg.get("max_bytes") or (2 * 2**20 if demo else 20 * 2**20)
    cfg["clip_model"] = cfg.get("clip_model") or cfg.get("rs_model")
    if cfg.get("clip_model") == cfg.get("rs_model") and not cfg.get("clip_pretrained"):
        cfg["clip_pretrained"] = cfg.get("rs_pretrained")
    if cfg.get("semdedup_eps") is None:
        cfg["semdedup_eps"] = 0.0002 if demo else 0.05
    if cfg.get("decontam_cosine") is None:
        cfg["decontam_cosine"] = 0.9998 if demo else 0.95
    if cfg.get("write_embeddings") and not cfg.get("embeddings_dir"):
        cfg["embeddings_dir"] = join(cfg["output"], "embeddings")
    needs_embed = [f for f in ("clip_threshold", "clip_top_percent", "embeddings_dir")
                   if cfg.get(f) is not None] + (["semdedup"] if cfg.get("semdedup") else [])
    if cfg["embed"] and not cfg.get("clip_model"):
        raise SystemExit("rs5m: --embed needs --clip_model (or --rs_model), or --embed=false")
    if needs_embed and not cfg["embed"]:
        raise SystemExit(f"rs5m: {', '.join('--' + f for f in needs_embed)} need --embed")
    if not cfg.get("input"):
        raise SystemExit("rs5m: give --input GLOB (LAION-style parquet) or --demo_world DIR")
    if cfg["rs_filter"] and not (cfg.get("rs_model") and cfg.get("rs_probe")):
        raise SystemExit("rs5m: the RS filter needs --rs_model and --rs_probe "
                         "(or --rs_filter=false)")
    return cfg


_OWN_FLAGS: set[str] = set()


def _own_flags() -> set[str]:
    import argparse

    p = argparse.ArgumentParser()
    RS5MOptions._add_argparse_args(p)
    return {a.dest for a in p._actions if a.dest != "help"}


_OWN_FLAGS = _own_flags()


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


def manifest(cfg: dict[str, Any], runner: str) -> dict[str, Any]:
    return {
        "recipe": RECIPE,
        "subset": SUBSET,
        "schema_version": schemas.SCHEMA_VERSION,
        "config": {k: v for k, v in sorted(cfg.items()) if v is not None},
        "runner": runner,
        "git_revision": git_revision(),
        "python": platform.python_version(),
        "versions": {
            d: _version(d)
            for d in ("rs-corpus", "apache-beam", "pyarrow", "pillow", "torch", "open_clip_torch")
        },
    }


def _route(fn):
    """A pure stage ``record -> record | Reject`` as a FlatMap with a ``rejects`` output."""

    def apply(record):
        out = fn(record)
        if isinstance(out, dict):
            yield out
        else:
            yield beam.pvalue.TaggedOutput(REJECTS, reject_row(record, out))

    return apply


def build(p: beam.Pipeline, cfg: dict[str, Any], runner: str = "DirectRunner"):
    """Compose the PUB11 pipeline on ``p``; returns the PCollection of the final stats doc."""
    cmap = ColumnMap(cfg.get("url_col"), cfg.get("caption_col"), cfg.get("id_col"),
                     cfg.get("source"))
    read = p | "Read" >> ReadLaionParquet(cfg["input"], cmap, SUBSET)
    inputs = (read.records, read[REJECTS]) | "AllInputs" >> beam.Flatten()

    kw = KeywordFilter.load(cfg.get("keywords"))
    keyword = read.records | "Keywords" >> beam.FlatMap(_route(kw)).with_outputs(
        REJECTS, main="records"
    )
    by_url = keyword.records | "UrlDedup" >> DedupByUrl()
    fetch_cfg = FetchConfig(
        timeout=cfg["timeout"],
        retries=cfg["retries"],
        max_bytes=cfg["max_bytes"],
        user_agent=cfg["fetch_user_agent"],
        respect_noai=cfg["respect_noai"],
        threads=cfg["thread_count"],
    )
    image_cfg = ImageConfig(
        image_size=cfg["image_size"],
        resize_mode=cfg["resize_mode"],
        resize_only_if_bigger=cfg["resize_only_if_bigger"],
        min_image_size=cfg["min_image_size"],
        max_aspect_ratio=cfg.get("max_aspect_ratio") or float("inf"),
        encode_quality=cfg["encode_quality"],
        crop_hashes=cfg["dedup_crops"],
    )
    # each body is decoded in the thread that fetched it: decoding (PIL releases the GIL)
    # overlaps with the other downloads in flight; decode rejects keep their stage
    fetched = by_url.records | "FetchDecode" >> Fetch(fetch_cfg, decode=image_cfg)
    unique = fetched.ok | "Dedup" >> DedupByContent(
        cfg["phash_hamming"], cfg["dedup"], crops=cfg["dedup_crops"])
    rs = unique["records"] | "RSFilter" >> RSFilter(
        cfg.get("rs_model"),
        cfg.get("rs_pretrained"),
        cfg.get("rs_probe"),
        threshold=cfg.get("rs_threshold"),
        device=cfg.get("device"),
        enabled=cfg["rs_filter"],
    )
    embedded = rs.records | "Embed" >> Embed(
        cfg.get("clip_model"), cfg.get("clip_pretrained"), device=cfg.get("device"),
        precision=cfg["clip_precision"], batch_size=cfg["clip_batch_size"],
        enabled=cfg["embed"],
    )
    stage_rejects = [embedded[REJECTS]]
    records = embedded.records
    if cfg.get("clip_threshold") is not None or cfg.get("clip_top_percent") is not None:
        scored = records | "ClipFilter" >> ClipScoreFilter(cfg.get("clip_threshold"),
                                                          cfg.get("clip_top_percent"))
        records = scored["records"]
        stage_rejects.append(scored[REJECTS])
    specs = parse_specs(cfg.get("decontam"))
    if specs:
        from pipelines.models.handlers import OpenClipImageEmbedder

        embedder = None
        if cfg["embed"]:
            embedder = OpenClipImageEmbedder(cfg["clip_model"], cfg.get("clip_pretrained"),
                                             device=cfg.get("device"),
                                             precision=cfg["clip_precision"],
                                             batch_size=cfg["clip_batch_size"])
        clean = records | "Decontaminate" >> Decontaminate(
            specs, image_cfg, embedder, max_hamming=cfg["decontam_hamming"],
            min_cosine=cfg["decontam_cosine"],
        )
        records = clean["records"]
        stage_rejects.append(clean[REJECTS])
    sem = records | "SemanticDedup" >> SemanticDedup(
        SemDedupConfig(eps=cfg["semdedup_eps"], cluster_size=cfg["semdedup_cluster_size"],
                       max_cluster=cfg["semdedup_max_cluster"],
                       sample_size=cfg["semdedup_sample"], margin=cfg["semdedup_margin"],
                       seed=cfg["semdedup_seed"]),
        enabled=cfg["semdedup"],
    )
    kept = sem["records"]
    emb_parts = None
    if cfg.get("embeddings_dir"):
        from pipelines.sinks.embeddings import WriteEmbeddings

        emb_parts = kept | "Embeddings" >> WriteEmbeddings(cfg["embeddings_dir"], SUBSET,
                                                           cfg["samples_per_shard"])
    rejects = (
        read[REJECTS], keyword[REJECTS], fetched[REJECTS], rs[REJECTS],
        *stage_rejects,
    ) | "AllRejects" >> beam.Flatten()
    duplicates = (
        by_url[DUPLICATES], unique[DUPLICATES], sem[DUPLICATES]
    ) | "AllDuplicates" >> beam.Flatten()
    outputs = {"inputs": inputs, "kept": kept, "rejects": rejects, "duplicates": duplicates}
    if emb_parts is not None:
        outputs["embeddings"] = emb_parts
    return outputs | "Write" >> WriteBuild(
        cfg["output"], RECIPE, SUBSET, manifest(cfg, runner), cfg["samples_per_shard"]
    )


def clear_previous(output: str, embeddings_dir: str | None = None) -> None:
    """Remove the files of an earlier build of this subset so none survives as stale."""
    patterns = [join(output, d, f"{SUBSET}-*") for d in ("shards", "index", "rejects",
                                                         "duplicates")]
    patterns += [join(output, n) for n in ("stats.json", "sizes.json", "manifest.json")]
    for pat in patterns:
        found = [m.path for m in FileSystems.match([pat])[0].metadata_list]
        if found:
            FileSystems.delete(found)
    if embeddings_dir:
        from pipelines.sinks.embeddings import clear

        clear(embeddings_dir)


def run(argv: list[str] | None = None) -> dict[str, Any] | None:
    opts = PipelineOptions(argv)
    cfg = resolve(opts.view_as(RS5MOptions))
    # our DoFns reference module-level code: ship the main session's imports with them
    opts.view_as(SetupOptions).save_main_session = False
    runner = opts.view_as(StandardOptions).runner or "DirectRunner"
    dry_run = opts.get_all_options().get("dry_run")
    if not dry_run:
        clear_previous(cfg["output"], cfg.get("embeddings_dir"))
    log.info("rs5m/pub11: %s → %s on %s", cfg["input"], cfg["output"], runner)
    with beam.Pipeline(options=opts) as p:
        build(p, cfg, runner)
    if dry_run:
        log.info("dry run: the pipeline translated; nothing was submitted")
        return None
    with FileSystems.open(join(cfg["output"], "stats.json")) as f:
        stats = json.loads(f.read())
    from pipelines import stats as stats_report

    print(stats_report.report(cfg["output"]))
    if cfg.get("decontam"):
        from pipelines.stages import decontam

        print(decontam.report(cfg["output"], parse_specs(cfg["decontam"])))
    if cfg.get("demo_world"):
        from pipelines.demo import scoring

        print(scoring.report(cfg["output"], cfg["demo_world"]))
    return stats


def main() -> None:
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # our progress at INFO; Beam's and open_clip's chatter (root logger) only when it matters
    for name in ("rs5m", "pipelines"):
        logging.getLogger(name).setLevel(logging.INFO)
    run(sys.argv[1:])


if __name__ == "__main__":
    main()
