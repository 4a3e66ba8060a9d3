"""Your own captioned RS images: a folder → a corpus, or a subset of any other recipe's build.

    read the caption table (or the .txt beside each image) → unique ids → read + decode
    (bomb-guarded, resized like every subset) → the shared tail (content dedup, embed, CLIP
    filter, decontaminate, semantic dedup) → shards/local-*.tar

``make build-local INPUT=folder [OUTPUT=out/local]``; the folder layouts are in
:mod:`pipelines.sources.folder`. Any other recipe takes the same folder as one more subset
(``--local DIR``), built and deduplicated together with its own subsets; an image found in
both is kept in this one (your captions beat web alt text: ``kit.PRIORITY_OWN``).
"""

from __future__ import annotations

import argparse
from typing import Any

import apache_beam as beam

from pipelines.recipes import kit
from pipelines.sources.folder import ReadCaptionedFolder
from pipelines.sources.laion import MAX_CAPTION_CHARS
from pipelines.stages.fetch import Fetch
from pipelines.stages.unique_keys import UniqueKeys


class LocalFolder(kit.Head):
    """A folder of captioned images as the subset ``local`` (``--local_subset`` renames it)."""

    subset = "local"
    title = "a folder of captioned images (--local DIR)"
    priority = kit.PRIORITY_OWN
    dedups_content = False
    caption_kinds = ("human",)

    def add_flags(self, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("local: a folder of captioned images")
        g.add_argument("--local", help="the folder (local, gs://, s3://): a caption table "
                       "(metadata.jsonl/csv/parquet, captions.*) or a .txt beside each image")
        g.add_argument("--local_subset", default="local",
                       help="subset name of the folder's samples (default %(default)s)")
        g.add_argument("--local_source", help="source name (default: the folder's name)")
        g.add_argument("--local_captions", help="the caption table, if not one of the "
                       "standard names")
        g.add_argument("--local_max_caption_chars", type=int, default=MAX_CAPTION_CHARS)

    def subset_name(self, cfg: dict[str, Any]) -> str:
        return cfg.get("local_subset") or self.subset

    def given(self, cfg: dict[str, Any]) -> bool:
        return bool(cfg.get("local"))

    def expand(self, p: beam.Pipeline, cfg: dict[str, Any]) -> kit.Branch:
        subset = self.subset_name(cfg)
        source = ReadCaptionedFolder(cfg["local"], subset, cfg.get("local_source"),
                                     cfg.get("local_captions"), cfg["local_max_caption_chars"])
        b = kit.Branch.read(p, subset, "Read", source)
        b.apply("UniqueIds", UniqueKeys())
        # the images are read by the fetch stage, allowed inside the folder only (a symlink
        # out of it is refused), each decoded in the thread that read it
        fetch = kit.fetch_config(cfg, allowed_prefixes=(source.root,))
        b.apply("ReadDecode", Fetch(fetch, decode=kit.image_config(cfg)))
        return b


RECIPE = kit.Recipe("local", __doc__ or "", [LocalFolder()], "out/local")

run, main = RECIPE.run, RECIPE.main  # the entry points (tests call run(argv))


if __name__ == "__main__":
    main()
