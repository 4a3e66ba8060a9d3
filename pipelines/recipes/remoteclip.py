"""RemoteCLIP: detection boxes → captions (Box-to-Caption), segmentation masks → boxes →
captions (Mask-to-Box), plus retrieval caption sets, as one subset ``remoteclip``.

    read annotations (DOTA, VOC, COCO, YOLO, class-index and colour-coded masks, Karpathy
    caption JSON; large scenes cut into tiles) → hold out the counting benchmark's images →
    unique ids → decode → content dedup (across datasets: one image shipped by two sets is
    kept once) → Mask-to-Box → Box-to-Caption (five rule-based captions) → the shared tail
    (pipelines.recipes.kit), decontaminated against every caption set's test and val splits

``make build-remoteclip INPUT="dota=dota:/d/DOTA,loveda=mask_index:/d/LoveDA" OUTPUT=…``;
``--annotations`` repeats, one dataset each (``name=format:root``, or ``name=root`` with the
format detected from the layout; :mod:`pipelines.sources.annotations`). One subset
(``remoteclip``, ``--remoteclip_subset`` renames it); each dataset is a ``source``, so
``make stats`` prints a row per dataset.

**Leakage control.** Every Karpathy caption set given as a source is also a decontamination
benchmark for its ``test`` and ``val`` splits (``{name}_test``), so a test image that another
dataset ships is removed from training and reported per source. RemoteCLIP's own rule was a
pHash Hamming distance below 2 (``--decontam_hamming 1``); ours (the default) is Hamming ≤ 4
on the full picture and its centre crops, plus the CLIP-embedding cosine. Images held out for
the counting benchmark (``make remotecount`` writes their manifest) are kept out with
``--holdout MANIFEST``.

**On a cluster** the datasets are listed by the workers, and the holdout manifest is read
by them; the launcher lists nothing in a bucket when every gs:// / s3:// dataset names its
format and a caption set names its JSON (``rsicd=karpathy:gs://b/rsicd/dataset_rsicd.json``):
the decontamination spec of a caption set must be known when the job is built
(:meth:`RemoteClipHead.resolve`); the decontamination stage reads its benchmarks (the
caption JSON and its test/val images) on the workers (``pipelines.stages.decontam``).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import apache_beam as beam

from pipelines.recipes import kit
from pipelines.records import Reject
from pipelines.sinks.shards import read_json
from pipelines.stages.unique_keys import UniqueKeys

HOLDOUT_STAGE = "holdout"
LOG = logging.getLogger(__name__)


def holdout_filter(held: frozenset[tuple[str, str]]):
    """A pure stage: a record whose (source, image) a benchmark manifest holds out is rejected
    (``held_out``); a tile counts as its scene's image."""

    def check(record: dict[str, Any]) -> dict[str, Any] | Reject:
        image = str(record["source_id"]).split("@", 1)[0]
        if (record["source"], image) in held:
            return Reject(HOLDOUT_STAGE, "held_out", "image of the counting benchmark")
        return record

    return check


class HoldoutFilter:
    """:func:`holdout_filter` of a manifest read where the stage runs (once per worker
    process, on first use), so a gs:// manifest is not read by the launcher."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._check = None

    def __call__(self, record: dict[str, Any]) -> dict[str, Any] | Reject:
        if self._check is None:
            self._check = holdout_filter(read_holdout(self.path))
        return self._check(record)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_check": None}


def read_holdout(path: str) -> frozenset[tuple[str, str]]:
    """The (dataset, source_id) pairs of a ``make remotecount`` manifest."""
    doc = read_json(path)
    items = doc.get("images", doc) if isinstance(doc, dict) else doc
    if not isinstance(items, list):
        raise SystemExit(f"remoteclip: {path} is not a remotecount manifest")
    return frozenset((str(it["dataset"]), str(it["source_id"])) for it in items)


class RemoteClipHead(kit.Head):
    """Detection and segmentation annotations and retrieval caption sets → one subset."""

    subset = "remoteclip"
    title = "detection/segmentation annotations and caption sets (--annotations name=format:root)"
    priority = kit.PRIORITY_ARCHIVE
    dedups_content = True
    caption_kinds = ("box2caption", "mask2box", "human")

    def add_flags(self, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("remoteclip: annotated datasets")
        g.add_argument("--annotations", action="append",
                       help="a dataset as name=format:root (dota, voc, coco, yolo, mask_index, "
                       "mask_rgb, karpathy) or name=root (format detected); repeat, or "
                       "comma-separate; local, gs://, s3://")
        g.add_argument("--remoteclip_subset", default="remoteclip",
                       help="subset name (default %(default)s)")
        g.add_argument("--tile", type=int, help="cut images larger than SIZE px into SIZE×SIZE "
                       "tiles (DOTA/iSAID scenes run to 20k px); default: whole images")
        g.add_argument("--tile_overlap", type=float, default=0.2,
                       help="tile overlap share (default %(default)s)")
        g.add_argument("--mask_min_area", type=int, default=0,
                       help="Mask-to-Box: drop components smaller than this many pixels "
                       "(RemoteCLIP states none; default %(default)s)")
        g.add_argument("--b2c_templates", help="Box-to-Caption templates (default: the bundled "
                       "remoteclip_templates.json)")
        g.add_argument("--class_names", help="class-name normalisation and mask class tables "
                       "(default: the bundled remoteclip_classes.json)")
        g.add_argument("--holdout", help="a `make remotecount` manifest: its images are kept "
                       "out of training")
        g.add_argument("--decontam_caption_sets", type=kit.as_bool, default=True,
                       help="decontaminate against the test and val splits of every caption "
                       "set given as a source (default true)")

    def subset_name(self, cfg: dict[str, Any]) -> str:
        return cfg.get("remoteclip_subset") or self.subset

    def given(self, cfg: dict[str, Any]) -> bool:
        return bool(cfg.get("annotations"))

    def specs(self, cfg: dict[str, Any]) -> list[str]:
        return [s.strip() for item in cfg.get("annotations") or [] for s in item.split(",")
                if s.strip()]

    def resolve(self, cfg: dict[str, Any]) -> None:
        """Checks the specs and adds each caption set's decontamination spec.

        Nothing in a bucket is listed or read here when every gs:// / s3:// spec names its
        format and every remote caption set names its JSON (``name=karpathy:ROOT/x.json``).
        Otherwise, with ``--decontam_caption_sets`` on, a remote root without a format is
        listed here to learn whether it is a caption set, and a remote caption set without a
        named JSON to find its JSON: the decontamination specs are part of the job graph, so
        they must be known before the pipeline is built (a warning says so)."""
        from pipelines.sources.annotations import caption_set_path, detected, is_remote, parse_spec

        try:
            specs = [parse_spec(s) for s in self.specs(cfg)]  # local roots detected here
            if cfg["decontam_caption_sets"]:
                for i, s in enumerate(specs):
                    if s.format is None:
                        LOG.warning("remoteclip: listing %s on the launcher to tell whether "
                                    "%s is a caption set (name its format to avoid it)",
                                    s.root, s.name)
                        specs[i] = detected(s)
        except ValueError as e:
            raise SystemExit(f"remoteclip: {e}") from None
        if cfg["decontam_caption_sets"]:
            extra = []
            for s in specs:
                if s.format != "karpathy":
                    continue
                if is_remote(s.root) and not s.caption_json:
                    LOG.warning("remoteclip: listing %s on the launcher to find %s's caption "
                                "JSON (name it, %s=karpathy:ROOT/FILE.json, to avoid it)",
                                s.root, s.name, s.name)
                extra.append(f"{s.name}_test={caption_set_path(s)}@test@val")
            cfg["decontam"] = list(cfg.get("decontam") or []) + extra
        holdout = cfg.get("holdout")
        if holdout and "://" not in holdout:
            read_holdout(holdout)  # an unusable manifest fails before any work

    def expand(self, p: beam.Pipeline, cfg: dict[str, Any]) -> kit.Branch:
        from pipelines.sources.annotations import ReadAnnotations
        from pipelines.stages.box_captions import BoxToCaption
        from pipelines.stages.dedup import DedupByContent
        from pipelines.stages.images import Decode
        from pipelines.stages.mask_boxes import MaskToBox

        subset = self.subset_name(cfg)
        b = kit.Branch.read(p, subset, "Read", ReadAnnotations(
            self.specs(cfg), subset, tile=cfg.get("tile"), tile_overlap=cfg["tile_overlap"]))
        if cfg.get("holdout"):
            # read where the stage runs: a gs:// manifest is not read by the launcher
            b.apply_fn("Holdout", HoldoutFilter(cfg["holdout"]))
        b.apply("UniqueIds", UniqueKeys())
        b.apply("Decode", Decode(kit.image_config(cfg)))
        if cfg["dedup"]:
            b.apply("Dedup", DedupByContent(cfg["phash_hamming"], crops=cfg["dedup_crops"]))
        b.apply("MaskToBox", MaskToBox(cfg.get("class_names"), min_area=cfg["mask_min_area"]))
        b.apply("BoxToCaption", BoxToCaption(cfg.get("b2c_templates"), cfg.get("class_names"),
                                             resize_mode=cfg["resize_mode"]))
        return b


RECIPE = kit.Recipe("remoteclip", __doc__ or "", [RemoteClipHead()], "out/remoteclip")

run, main = RECIPE.run, RECIPE.main  # the entry points (tests call run(argv))


if __name__ == "__main__":
    main()
