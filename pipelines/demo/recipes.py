"""How the demo world drives the recipes: the flags that point a recipe at the world.

Recipes know nothing of the demo (dependencies run one way); the demo knows each recipe's
flags. ``recipe_args(world, "rs5m")`` is what ``make build-rs5m`` (``python -m pipelines.demo
run``) puts before the user's own flags (which win, being later):

* the inputs: for ``remoteclip`` the annotated datasets the world lists in
  ``remoteclip/annotations.txt``; for ``skyscript`` the OSM extracts and the imagery under
  ``skyscript/``; otherwise the world's web parquet (``pub11/*/*.parquet``), label-only archives
  (``rs3/fmow-rgb``, ``rs3/fmow-full``, ``rs3/bigearthnet``, ``rs3/millionaid``) and
  captioned folder (``local/``), whichever the world has;
* the tiny models the world built (``models/tiny-clip``, ``models/rs_probe.json``,
  ``models/tiny-blip2``); the tiny captioner's captions are short (12 new tokens at most);
* the loopback server is allowed through the address guard (``127.0.0.0/8``) — nothing else
  is: the world's planted metadata-address and private-redirect rows must be refused;
* limits sized to the world: its slow rows sleep 6 s (timeout 3 s), its too-large file is
  2.4 MB (byte cap 2 MiB), its dripping rows are cut by a 5 s deadline;
* thresholds for a random-weight model, which puts distinct images at cosine 0.999+
  (semantic dedup ε 0.0002, decontamination cosine 0.99995: the closest distinct pair of a
  RemoteCLIP world with ``--n-remoteclip 400`` and its test split lies at 0.9998).
"""

from __future__ import annotations

import os

#: flags for a world served on loopback, whatever the recipe
WORLD_LIMITS = [
    "--timeout", "3", "--fetch_deadline", "5", "--max_bytes", str(2 * 2**20),
    "--allow_networks", "127.0.0.0/8",
    "--semdedup_eps", "0.0002", "--decontam_cosine", "0.99995",
]
RECIPES = ("rs5m", "local", "remoteclip", "skyscript")


def recipe_args(world: str, recipe: str = "rs5m") -> list[str]:
    """The flags that point ``recipe`` at the demo world in ``world``."""
    if recipe not in RECIPES:
        raise ValueError(f"the demo world drives {RECIPES}, not {recipe!r}")
    models = os.path.join(world, "models")
    args = list(WORLD_LIMITS)
    local = os.path.join(world, "local")
    if recipe == "rs5m":
        args += ["--input", os.path.join(world, "pub11", "*", "*.parquet"),
                 "--rs_model", os.path.join(models, "tiny-clip"),
                 "--rs_probe", os.path.join(models, "rs_probe.json")]
        rs3 = os.path.join(world, "rs3")
        if os.path.isdir(rs3):
            fmow = [os.path.join(rs3, d) for d in ("fmow-rgb", "fmow-full")
                    if os.path.isdir(os.path.join(rs3, d))]
            if fmow:
                args += ["--fmow", ",".join(fmow)]
            for flag, d in (("--bigearthnet", "bigearthnet"), ("--millionaid", "millionaid")):
                if os.path.isdir(os.path.join(rs3, d)):
                    args += [flag, os.path.join(rs3, d)]
            args += ["--captioner", os.path.join(models, "tiny-blip2"),
                     "--caption_max_new_tokens", "12"]
    elif recipe == "remoteclip":
        # the world's large scene (2200x1650) is cut into 1024 px tiles
        args += ["--clip_model", os.path.join(models, "tiny-clip"), "--tile", "1024"]
        listing = os.path.join(world, "remoteclip", "annotations.txt")
        if os.path.isfile(listing):
            with open(listing, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        args += ["--annotations", line.strip()]
        return args  # the captioned folder is rs5m's and local's
    elif recipe == "skyscript":
        # absolute: the rejects of unusable files name them by path, as the truth does
        sky = os.path.join(os.path.abspath(world), "skyscript")
        return args + ["--clip_model", os.path.join(models, "tiny-clip"),
                       "--osm", os.path.join(sky, "osm", "*"),
                       "--imagery", os.path.join(sky, "imagery", "*", "*.tif")]
    else:
        args += ["--clip_model", os.path.join(models, "tiny-clip")]
    if os.path.isdir(local):
        args += ["--local", local]
    return args
