"""RS5M's RS3 subset: label-only RS archives → georeference → BLIP-2 captions → meta captions.

    read FMoW (rgb + msrgb, JPEG or multispectral TIFF), BigEarthNet-S2 (12-band patches → RGB)
    and MillionAID (train class folders, unlabelled test) → unique ids → decode/normalise
    → content dedup (before captioning: no GPU time on copies) → georeference (centre,
    place, UTM, season, grid position) → caption (BLIP-2 or BLIP, K candidates, RunInference)
    → rotation-invariant pick (CLIP) → meta caption + picked caption, fitted to the text context
    → the shared tail (pipelines.recipes.kit)

RS5M merged each image's metadata into a templated sentence before the BLIP-2 caption, and
100% of its FMoW captions ran past CLIP's 77 tokens, so training cut the BLIP-2 part off.
Here the training caption always fits: metadata fields are dropped in a documented order
(:mod:`pipelines.stages.meta_captions`) and the generated part is never cut. Rows keep every
candidate (``generated``), each one's rotation-invariant score (``generated_scores``), the
picked one's index (``generated_pick``; ``generated[0]`` is the top by generation), the
metadata sentence (``meta_caption``) and what was dropped to fit (``meta_dropped``).

What the archive sources hand on (``pipelines.sources.archives.base_record``): the record
contract's ``key``/``source``/``source_id``/``url``/``license``/``labels``/``acquired``/
``gsd_m``/``crs``, and working fields for the stages after them — ``_body`` (the image bytes:
a JPEG as it is, multi-band rasters composed to 8-bit RGB and encoded as PNG), ``_pixel_size``
(the size the metadata describes), ``_footprint`` (fMoW's WGS84 ring), ``_geo`` (a raster's
CRS, affine transform and size, from the GeoTIFF), ``_target_box`` (fMoW's target, pixels)
and ``_meta`` (other archive metadata: country code, cloud cover, view angles, ...).
Georeference turns these into the geo columns; the caption stages add ``generated``,
``generated_scores``/``generated_pick``, then the caption columns.

``make build-rs5m ARGS="--subsets rs3 --fmow DIR --bigearthnet DIR --millionaid DIR
--captioner DIR --clip_model ..."`` builds RS3 alone; without ``--subsets`` every subset whose
input is given is built, PUB11 and RS3 into one corpus.
"""

from __future__ import annotations

import argparse
from typing import Any

import apache_beam as beam

from pipelines.recipes import kit
from pipelines.records import MAIN, REJECTS
from pipelines.stages.unique_keys import UniqueKeys


class ReadArchives(beam.PTransform):
    """The archives given, as one source: ``{"records", "rejects"}`` of every reader."""

    def __init__(self, cfg: dict[str, Any], subset: str):
        super().__init__()
        self.cfg = cfg
        self.subset = subset

    def readers(self) -> list[tuple[str, beam.PTransform]]:
        cfg, subset = self.cfg, self.subset
        out: list[tuple[str, beam.PTransform]] = []
        if cfg.get("fmow"):
            from pipelines.sources.fmow import ReadFmow

            variants = tuple(v.strip() for v in cfg["fmow_variants"].split(",") if v.strip())
            out.append(("Fmow", ReadFmow(cfg["fmow"], subset, variants=variants,
                                         max_bytes=cfg["archive_max_bytes"])))
        if cfg.get("bigearthnet"):
            from pipelines.sources.bigearthnet import ReadBigEarthNet

            out.append(("BigEarthNet", ReadBigEarthNet(
                cfg["bigearthnet"], subset, max_reflectance=cfg["ben_max_reflectance"],
                max_bytes=cfg["archive_max_bytes"])))
        if cfg.get("millionaid"):
            from pipelines.sources.millionaid import ReadMillionAID

            out.append(("MillionAID", ReadMillionAID(cfg["millionaid"], subset,
                                                     max_bytes=cfg["archive_max_bytes"])))
        return out

    def expand(self, p):
        records, rejects = [], []
        for name, reader in self.readers():
            outs = kit.stage_outputs(p | name >> reader, name)
            records.append(outs[MAIN])
            if REJECTS in outs:
                rejects.append(outs[REJECTS])
        return {MAIN: records | "Records" >> beam.Flatten(),
                REJECTS: (rejects or [p | "NoRejects" >> beam.Create([])])
                | "Rejects" >> beam.Flatten()}


class Rs3(kit.Head):
    """RS5M's RS3: label-only archives (FMoW, BigEarthNet, MillionAID) captioned by BLIP-2."""

    subset = "rs3"
    title = "label-only RS archives captioned by BLIP-2 (--fmow/--bigearthnet/--millionaid DIR)"
    priority = kit.PRIORITY_ARCHIVE
    dedups_content = True
    caption_kinds = ("meta+blip2", "blip2")

    def add_flags(self, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("rs3: label-only archives (local, gs://, s3://; "
                                      "comma-separate several roots)")
        g.add_argument("--fmow", help="fMoW roots (fmow-rgb JPEGs and/or fmow-full TIFFs: "
                       "{split}/{category}/{category}_{n}/..._{rgb|msrgb}.{jpg|tif} + .json)")
        g.add_argument("--fmow_variants", default="rgb,msrgb",
                       help="fMoW image variants to read (default %(default)s, as RS5M did; "
                       "copies of one capture are then removed by content dedup)")
        g.add_argument("--bigearthnet", help="BigEarthNet-S2 v1 roots (a folder per patch)")
        g.add_argument("--ben_max_reflectance", type=float, default=0.3,
                       help="BigEarthNet RGB stretch: reflectance (DN/10000) mapped to 255 "
                       "(default %(default)s)")
        g.add_argument("--millionaid", help="MillionAID roots (train/ class folders, test/)")
        g.add_argument("--archive_max_bytes", type=int, default=2**30,
                       help="byte cap per archive file read (default 1 GiB)")
        g = parser.add_argument_group("rs3: georeference")
        g.add_argument("--place_radius_km", type=float, default=25.0,
                       help="name the nearest town only within this distance (default "
                       "%(default)s)")
        g.add_argument("--region_radius_km", type=float, default=150.0,
                       help="name the nearest town's region only within this distance "
                       "(default %(default)s); beyond it, the archive's country if given")
        g = parser.add_argument_group("rs3: captioning (a local Hugging Face BLIP-2 or BLIP "
                                      "directory)")
        g.add_argument("--captioner", help="model directory (local, gs://, s3://)")
        g.add_argument("--caption_precision", default="fp16", choices=["bf16", "fp16", "fp32"],
                       help="on GPU workers (CPU runs fp32; default %(default)s)")
        g.add_argument("--caption_batch_size", type=int, default=8)
        g.add_argument("--caption_candidates", type=int, default=5,
                       help="candidates per image (default %(default)s, as RS5M)")
        g.add_argument("--caption_num_beams", type=int,
                       help="beam width (default: the candidate count)")
        g.add_argument("--caption_do_sample", type=kit.as_bool, default=False,
                       help="sample instead of beam search (seeded)")
        g.add_argument("--caption_top_p", type=float)
        g.add_argument("--caption_temperature", type=float)
        g.add_argument("--caption_max_new_tokens", type=int, default=30)
        g.add_argument("--caption_min_new_tokens", type=int)
        g.add_argument("--caption_prompt", help="text prompt for the captioner (default none)")
        g.add_argument("--caption_seed", type=int, default=0)
        g.add_argument("--caption_share_model", type=kit.as_bool, default=False,
                       help="one captioner per machine, shared by its SDK processes (Beam's "
                       "large-model mode; for GPU VMs running several processes), instead of "
                       "one per process")
        g.add_argument("--meta_templates", help="meta-caption template file (default: the "
                       "bundled rs3_meta_templates.json)")

    def given(self, cfg: dict[str, Any]) -> bool:
        return any(cfg.get(f) for f in ("fmow", "bigearthnet", "millionaid"))

    def resolve(self, cfg: dict[str, Any]) -> None:
        if not cfg.get("captioner"):
            raise SystemExit("rs5m: rs3 needs --captioner DIR (a local BLIP-2 or BLIP model "
                             "directory)")
        if not cfg.get("clip_model"):
            raise SystemExit("rs5m: rs3 needs --clip_model (its tokenizer fits the captions to "
                             "the context; the model picks the rotation-invariant caption)")
        if cfg["caption_candidates"] < 1:
            raise SystemExit("rs5m: --caption_candidates must be >= 1")

    def expand(self, p: beam.Pipeline, cfg: dict[str, Any]) -> kit.Branch:
        from pipelines.stages.caption_pick import RotationPick
        from pipelines.stages.captions import Caption
        from pipelines.stages.dedup import DedupByContent
        from pipelines.stages.georef import Georeference
        from pipelines.stages.images import Decode
        from pipelines.stages.meta_captions import MetaCaption

        b = kit.Branch.read(p, self.subset, "Read", ReadArchives(cfg, self.subset))
        b.apply("UniqueIds", UniqueKeys())
        b.apply("Decode", Decode(kit.image_config(cfg)))
        if cfg["dedup"]:
            b.apply("Dedup", DedupByContent(cfg["phash_hamming"], crops=cfg["dedup_crops"]))
        b.apply("Georeference", Georeference(cfg["place_radius_km"], cfg["region_radius_km"]))
        b.apply("Caption", kit.on_accelerator(Caption(
            cfg["captioner"], precision=cfg["caption_precision"], device=cfg.get("device"),
            batch_size=cfg["caption_batch_size"], candidates=cfg["caption_candidates"],
            num_beams=cfg.get("caption_num_beams"), do_sample=cfg["caption_do_sample"],
            top_p=cfg.get("caption_top_p"), temperature=cfg.get("caption_temperature"),
            max_new_tokens=cfg["caption_max_new_tokens"],
            min_new_tokens=cfg.get("caption_min_new_tokens"),
            prompt=cfg.get("caption_prompt"), seed=cfg["caption_seed"],
            share_across_processes=cfg["caption_share_model"]), cfg))
        b.apply("RotationPick", kit.on_accelerator(RotationPick(
            cfg["clip_model"], cfg.get("clip_pretrained"), device=cfg.get("device"),
            precision=cfg["clip_precision"], batch_size=cfg["clip_batch_size"]), cfg))
        b.apply("MetaCaption", MetaCaption(cfg["clip_model"], cfg.get("meta_templates")))
        return b
