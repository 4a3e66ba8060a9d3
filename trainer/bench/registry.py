"""Known evaluation datasets, class-name normalisation and zero-shot prompt sets.

Each :class:`DatasetSpec` says what a dataset is (``task``), where it lives below ``--data-root``
(``path``, the usual folder name of the public release), which split the papers scored
(``split``: ``"whole"`` = every image, as GeoRSCLIP did; ``"test"`` = the ``test`` split of a
Karpathy JSON or of ``train/``+``test/`` folders; or the path of a split file), which prompt
sets zero-shot uses, and under which name ``published_results.csv`` lists it.

The prompt sets and the class-name table are data (``data/prompts.json``,
``data/classnames.json``), not code.
"""

from __future__ import annotations

import dataclasses
import json
import re
from functools import cache
from pathlib import Path

from pipelines.sources.benchmarks import guess_task

DATA_DIR = Path(__file__).resolve().parent / "data"
TASKS = ("classification", "retrieval", "counting", "selo")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str
    task: str
    path: str  # below --data-root, or absolute
    split: str = "whole"
    prompts: tuple[str, ...] = ("remoteclip",)
    published: str | None = None  # the dataset's name in published_results.csv
    note: str = ""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"{self.name}: task must be one of {TASKS}, got {self.task!r}")


def _cls(name: str, path: str | None = None, published: str | None = None, **kw) -> DatasetSpec:
    return DatasetSpec(name, "classification", path or name, published=published or name, **kw)


#: the datasets of the three papers' evaluations (folder names as the public releases unpack)
KNOWN: dict[str, DatasetSpec] = {s.name: s for s in [
    # scene classification, class-per-folder; whole dataset as GeoRSCLIP and RemoteCLIP scored it
    _cls("AID", prompts=("remoteclip", "georsclip", "skyscript")),
    _cls("RESISC45", "NWPU-RESISC45", prompts=("remoteclip", "georsclip", "skyscript")),
    _cls("EuroSAT", "EuroSAT/2750", prompts=("remoteclip", "georsclip", "skyscript")),
    _cls("UCM", "UCMerced_LandUse/Images"),
    _cls("WHU-RS19", "WHU-RS19"),
    _cls("RSSCN7", "RSSCN7"),
    _cls("PatternNet", "PatternNet/images", prompts=("remoteclip", "skyscript")),
    _cls("RSI-CB128", "RSI-CB128"),
    _cls("RSI-CB256", "RSI-CB256", prompts=("remoteclip", "skyscript")),
    _cls("OPTIMAL-31", "OPTIMAL-31/Images"),
    _cls("RSC11", "RS_C11_Database"),
    _cls("MLRSNet", "MLRSNet"),
    _cls("RS2800", "RS2800"),
    _cls("WHU-earth", "WHU-earth"),
    # SkyScript's scene sets are crops of fMoW / Million-AID (test split files beside them)
    _cls("fMoW", "fmow-crops", prompts=("skyscript",), split="whole",
         note="SkyScript's fMoW crops, class-per-folder"),
    _cls("Million-AID", "million-aid-crops", prompts=("skyscript",)),
    # SkyScript fine-grained sets (60-100 images per class)
    _cls("roof-shape", "skyscript_fine/roof_shape", prompts=("skyscript",)),
    _cls("road-smoothness", "skyscript_fine/smoothness", prompts=("skyscript",)),
    _cls("road-surface", "skyscript_fine/surface", prompts=("skyscript",)),
    # retrieval, Karpathy-style caption JSON, test split
    DatasetSpec("RSICD", "retrieval", "RSICD", split="test", published="RSICD"),
    DatasetSpec("RSITMD", "retrieval", "RSITMD", split="test", published="RSITMD"),
    DatasetSpec("UCM-captions", "retrieval", "UCM-captions", split="test", published="UCM"),
    # counting, RemoteCount style
    DatasetSpec("RemoteCount", "counting", "RemoteCount", published="RemoteCount"),
    # semantic localisation, AIR-SLT style
    DatasetSpec("AIR-SLT", "selo", "AIR-SLT", published="AIR-SLT"),
    # the demo benchmark (pipelines/demo/benchmarks.py; `make bench` writes it first)
    DatasetSpec("demo-scenes", "classification", "scenes", split="split.json",
                prompts=("remoteclip", "georsclip"),
                note="held-out demo scenes, 13 classes; zero-shot on the test split"),
    DatasetSpec("demo-retrieval", "retrieval", "retrieval", split="test"),
    DatasetSpec("demo-counting", "counting", "counting"),
    DatasetSpec("demo-roof-shape", "classification", "fine/roof_shape", split="split.json",
                prompts=("skyscript", "osm"),
                note="held-out demo buildings, 3 roof shapes (SkyScript's fine-grained style); "
                     "'osm' prompts are the bare phrase, as the tag captions are"),
]}

DEMO_DATASETS = ("demo-scenes", "demo-retrieval", "demo-counting", "demo-roof-shape")


@cache
def _classname_table() -> dict:
    return json.loads((DATA_DIR / "classnames.json").read_text())


@cache
def _prompt_table() -> dict:
    return json.loads((DATA_DIR / "prompts.json").read_text())


_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def normalise_classname(folder: str, dataset: str | None = None) -> str:
    """The English name zero-shot prompts use for a class folder.

    ``denseresidential`` → "dense residential", ``AnnualCrop`` → "annual crop",
    ``parking_lot`` → "parking lot", ``Baseball-Field`` → "baseball field". Order: the
    dataset's own override, then the compound-word table, then splitting camelCase,
    ``_`` and ``-``; the result is lower case with single spaces.
    """
    table = _classname_table()
    override = table.get("datasets", {}).get(dataset or "", {}).get(folder)
    if override:
        return override
    key = re.sub(r"[\s_\-]+", "", folder).lower()
    compound = table["compounds"].get(key)
    if compound:
        return compound
    words = _CAMEL.sub(" ", folder)
    words = re.sub(r"[_\-]+", " ", words)
    return re.sub(r"\s+", " ", words).strip().lower()


def prompt_sets() -> list[str]:
    return sorted(k for k in _prompt_table() if not k.startswith("_"))


def prompt_templates(name: str) -> list[str]:
    """The templates of a named prompt set, each with ``{c}`` where the class name goes."""
    table = _prompt_table()
    if name not in table or name.startswith("_"):
        raise KeyError(f"unknown prompt set {name!r}; known: {prompt_sets()}")
    entry = table[name]
    if "templates" in entry:
        out = list(entry["templates"])
    else:
        out = [f.replace("{img}", p) for f in entry["frames"] for p in entry["phrasings"]]
    return [t.replace("{}", "{c}") for t in out]


def fill_template(template: str, classname: str) -> str:
    return template.replace("{}", "{c}").replace("{c}", classname)


def resolve(name: str, data_root: str | Path, demo_root: str | Path | None = None
            ) -> tuple[DatasetSpec, Path]:
    """``NAME`` (a known dataset under ``data_root``) or ``NAME=PATH`` → (spec, path).

    An unknown ``NAME=PATH`` gets its task guessed from the contents (see
    :func:`pipelines.sources.benchmarks.guess_task`).
    """
    path: str | None = None
    if "=" in name:
        name, path = name.split("=", 1)
    spec = KNOWN.get(name)
    if spec is None:
        if path is None:
            raise KeyError(
                f"unknown dataset {name!r}: pass NAME=PATH, or one of {sorted(KNOWN)}")
        spec = DatasetSpec(name, guess_task(path), path, published=name)
    if path is None:
        root = Path(demo_root) if (spec.name in DEMO_DATASETS and demo_root) else Path(data_root)
        p = Path(spec.path)
        path = str(p if p.is_absolute() else root / p)
    return spec, Path(path)
