"""RS5M: PUB11 (remote-sensing pairs mined from LAION-style web parquet) and RS3 (label-only
RS archives captioned by BLIP-2), plus your own captioned folder (``--local``), in one corpus.

    pub11: read parquet → keyword filter → unique ids → URL dedup → fetch + decode/normalise
           → content dedup (sha256 + pHash) → RS-image filter (CLIP linear probe)
    rs3:   see pipelines.recipes.rs3 (FMoW, BigEarthNet, MillionAID → georeference →
           BLIP-2 candidates → rotation-invariant pick → meta caption fitted to the context)
    local: see pipelines.recipes.local
    then the shared tail (pipelines.recipes.kit): content dedup across subsets → CLIP
    embeddings (image + caption, clip_score) → CLIP-score filter → test-set decontamination
    → semantic dedup (SemDeDup) → shards (+ the clip-retrieval embeddings folder, if asked)

PUB11 deduplicates before its RS filter, as RS5M did, so the stage table has RS5M's shape
(downloaded → invalid → duplicates → non-RS → kept). Defaults: embeddings and ``clip_score``
on; CLIP-score filter, semantic dedup and decontamination off until their flags are given.
Every input row ends in exactly one of shards/, rejects/ or duplicates/, and the build fails
unless ``input == kept + rejected + duplicates`` for every subset.
"""

from __future__ import annotations

import argparse
from typing import Any

import apache_beam as beam

from pipelines.recipes import kit
from pipelines.recipes.local import LocalFolder
from pipelines.recipes.rs3 import Rs3
from pipelines.sources.laion import MAX_CAPTION_CHARS, MAX_EXTRA_BYTES, ColumnMap, ReadLaionParquet
from pipelines.stages.dedup import DedupByContent, DedupByUrl
from pipelines.stages.fetch import Fetch
from pipelines.stages.keywords import KeywordFilter
from pipelines.stages.rs_filter import RSFilter
from pipelines.stages.unique_keys import UniqueKeys


class Pub11(kit.Head):
    """RS5M's PUB11: RS image-text pairs mined from LAION-style web parquet."""

    subset = "pub11"
    title = "LAION-style web parquet (--input GLOB)"
    priority = kit.PRIORITY_WEB
    dedups_content = True
    caption_kinds = ("web",)

    def add_flags(self, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("pub11: LAION-style web parquet")
        g.add_argument("--input", help="glob(s) of LAION-style parquet, comma-separated "
                       "(local, gs://, s3://)")
        g.add_argument("--url_col", help="URL column (default: detect URL/url/image_url...)")
        g.add_argument("--caption_col", help="caption column (default: detect TEXT/caption...)")
        g.add_argument("--id_col", help="id column (default: detect SAMPLE_ID/id/key...)")
        g.add_argument("--source", help="force one source name (default: parent folder name)")
        g.add_argument("--keywords", help="keyword file (default: the bundled RS5M list)")
        g.add_argument("--max_caption_chars", type=int, default=MAX_CAPTION_CHARS,
                       help="reject longer captions (default %(default)s)")
        g.add_argument("--max_extra_bytes", type=int, default=MAX_EXTRA_BYTES,
                       help="reject rows whose other columns take more JSON bytes "
                       "(default %(default)s)")
        g = parser.add_argument_group("pub11: RS-image filter")
        g.add_argument("--rs_filter", type=kit.as_bool, default=True)
        g.add_argument("--rs_model", help="open_clip architecture or model directory (local, "
                       "gs://, s3://)")
        g.add_argument("--rs_pretrained", help="checkpoint for --rs_model (local, gs://, s3://)")
        g.add_argument("--rs_probe", help="probe JSON from `python -m pipelines.models.rs_probe"
                       " train`")
        g.add_argument("--rs_threshold", type=float, help="default: the probe's threshold")

    def given(self, cfg: dict[str, Any]) -> bool:
        return bool(cfg.get("input"))

    def defaults(self, cfg: dict[str, Any]) -> None:
        # one model for the RS filter and the embeddings, unless told otherwise
        cfg["clip_model"] = cfg.get("clip_model") or cfg.get("rs_model")
        if cfg.get("clip_model") == cfg.get("rs_model") and not cfg.get("clip_pretrained"):
            cfg["clip_pretrained"] = cfg.get("rs_pretrained")

    def resolve(self, cfg: dict[str, Any]) -> None:
        if cfg["rs_filter"] and not (cfg.get("rs_model") and cfg.get("rs_probe")):
            raise SystemExit("rs5m: the RS filter needs --rs_model and --rs_probe "
                             "(or --rs_filter=false)")

    def expand(self, p: beam.Pipeline, cfg: dict[str, Any]) -> kit.Branch:
        cmap = ColumnMap(cfg.get("url_col"), cfg.get("caption_col"), cfg.get("id_col"),
                         cfg.get("source"), cfg["max_caption_chars"], cfg["max_extra_bytes"])
        b = kit.Branch.read(p, self.subset, "Read",
                            ReadLaionParquet(cfg["input"], cmap, self.subset))
        b.apply_fn("Keywords", KeywordFilter.load(cfg.get("keywords")))
        b.apply("UniqueIds", UniqueKeys())
        b.apply("UrlDedup", DedupByUrl())
        # each body is decoded in the thread that fetched it: decoding (PIL releases the GIL)
        # overlaps with the other downloads in flight; decode rejects keep their stage
        b.apply("FetchDecode", Fetch(kit.fetch_config(cfg), decode=kit.image_config(cfg)))
        if cfg["dedup"]:
            b.apply("Dedup", DedupByContent(cfg["phash_hamming"], crops=cfg["dedup_crops"]))
        b.apply("RSFilter", kit.on_accelerator(RSFilter(
            cfg.get("rs_model"), cfg.get("rs_pretrained"), cfg.get("rs_probe"),
            threshold=cfg.get("rs_threshold"), device=cfg.get("device"),
            enabled=cfg["rs_filter"]), cfg))
        return b


RECIPE = kit.Recipe("rs5m", __doc__ or "", [Pub11(), Rs3(), LocalFolder()], "out/rs5m")

run, main = RECIPE.run, RECIPE.main  # the entry points (tests call run(argv))


if __name__ == "__main__":
    main()
