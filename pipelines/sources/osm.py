"""OpenStreetMap extracts → the SkyScript head's objects: one record per OSM object whose tags
name something visible from above (the tag table, ``pipelines/recipes/data/skyscript_tags.json``).

**Inputs.** ``.osm.pbf``, ``.osm`` (XML) and ``.osm.bz2`` files, read with pyosmium 4
(``osmium.FileProcessor(path).with_locations().with_areas()``): nodes, ways with their node
locations, and areas assembled by libosmium from closed ways and ``type=multipolygon``
relations. pyosmium reads files, not streams: a file on a remote filesystem (gs://, s3://) is
first copied, through ``FileSystems``, to a local temporary file (at most ``max_bytes``),
then read and deleted; bytes given directly are written to a temporary file too (the format
is sniffed from the first bytes). The node location cache is libosmium's ``flex_mem`` (in
memory): an extract's node locations and its kept objects are held by one worker, so cut
large regions into extracts of at most a few hundred MB.

**Cutting a region or the planet into extracts** (osmium-tool), so the extracts are read in
parallel, one file per Beam element::

    # extracts.json: {"directory": "extracts/", "extracts": [
    #   {"output": "ch-west.osm.pbf", "bbox": [5.9, 45.8, 7.5, 47.8]},
    #   {"output": "ch-east.osm.pbf", "bbox": [7.5, 45.8, 10.5, 47.8]},
    #   {"output": "zurich.osm.pbf",  "polygon": {"file_name": "zurich.geojson",
    #                                              "file_type": "geojson"}}]}
    osmium extract --config extracts.json --strategy complete_ways planet.osm.pbf
    gsutil -m cp extracts/*.osm.pbf gs://bucket/osm/     # then ReadOsm("gs://bucket/osm/*")

``--strategy complete_ways`` (the default ``simple`` cuts ways at the border) keeps every
node of a way that crosses the cut, and ``smart`` also completes multipolygon relations; an
object on a border may then appear in two extracts: the same key, which the tail's dedup by
key (or ``UniqueKeys``) drops. Ways still cut (``simple`` strategy, a hand-made clip) are
``missing_nodes`` rejects.

**Objects** (:func:`read_osm_objects`, :class:`OsmObject`). An object is kept when at least
one of its tags matches the table (:meth:`TagTable.match`); tagged objects without a match
are counted (``unmatched``), untagged ones are skipped without a count (libosmium filters
them). Geometry, WGS84 lon/lat, as WKB (``shapely``):

- a node → ``Point``;
- a way → ``LineString``; a closed way (first node = last node, ≥ 4 nodes) whose tags
  describe an area → ``Polygon``: everything except ``area=no`` and linear features
  (``highway``, ``railway``, ``barrier``, ``waterway`` and the (key, value)s of
  :data:`LINEAR_TAGS`, unless ``area=yes`` or one of :data:`AREA_TAGS`);
- a ``type=multipolygon`` relation → ``Polygon``/``MultiPolygon`` (osm_type ``r``).

``osm_type`` is OSM's letter: ``n``, ``w``, ``r`` (a closed way's polygon keeps ``w`` and
the way's id, SkyScript's file naming). ``focus`` is the focus entry
(:meth:`TagTable.focus`), ``max_gsd`` the coarsest GSD at which every entry the focus caption
uses is visible (the minimum of their ``gsd``).

**Rejects** (:data:`REASONS`, stage ``read``): ``osm_file_unreadable`` (one row per file
that cannot be read: missing, truncated, not OSM, over ``max_bytes``; no record of that file
is kept), ``missing_nodes`` (a way with a node not in the extract; a multipolygon relation
whose members are not all in the extract, so libosmium never assembles it),
``invalid_geometry`` (a self-intersecting polygon, rings that do not close, a way of one
distinct point). Invalid polygons are **rejected, not repaired** by default: a repaired
bow-tie is two triangles the mapper did not draw, and the tile would be cut around them;
``repair=True`` applies ``shapely.make_valid`` and keeps its polygonal part instead.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from importlib import resources
from typing import Any

import apache_beam as beam
import shapely
import shapely.wkb
from apache_beam.io.filesystems import FileSystems
from shapely.geometry import LineString, Point, Polygon

from pipelines.records import MAIN, REJECTS, Reject, new_record, reject_row

STAGE = "read"
SOURCE = "osm"
REASONS = ("osm_file_unreadable", "missing_nodes", "invalid_geometry")
KINDS = ("object", "prefix", "attribute")
GSD_CLASSES = (0.1, 0.2, 0.6, 1.0, 10.0)
#: the most bytes of one extract (copied from a remote filesystem, or given as bytes)
DEFAULT_MAX_BYTES = 8 << 30
SUFFIXES = (".osm.pbf", ".osm.bz2", ".osm", ".pbf")
TYPE_NAMES = {"n": "node", "w": "way", "r": "relation"}

#: keys whose closed ways are lines (a roundabout, a fence ring), not areas
LINEAR_KEYS = frozenset({"highway", "railway", "barrier", "waterway"})
#: (key, value)s of other keys that are lines even when closed
LINEAR_TAGS = frozenset({
    ("power", "line"), ("power", "minor_line"), ("power", "cable"), ("aeroway", "runway"),
    ("aeroway", "taxiway"), ("man_made", "pipeline"), ("man_made", "embankment"),
    ("man_made", "breakwater"), ("man_made", "groyne"), ("man_made", "cutline"),
    ("man_made", "dyke"), ("natural", "coastline"), ("natural", "cliff"),
    ("natural", "tree_row"), ("natural", "ridge"), ("natural", "arete"),
    ("natural", "earth_bank"),
})
#: (key, value)s of the linear keys that are areas when closed
AREA_TAGS = frozenset({
    ("waterway", "riverbank"), ("waterway", "dock"), ("waterway", "boatyard"),
    ("highway", "services"), ("highway", "rest_area"), ("railway", "platform"),
    ("railway", "station"), ("railway", "turntable"), ("barrier", "toll_booth"),
    ("barrier", "border_control"),
})
DEFAULT_TABLE = "skyscript_tags.json"


class OsmFileError(Exception):
    """A file that cannot be read as OSM data (missing, truncated, not OSM, too large)."""

    reason = "osm_file_unreadable"

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.path = path
        self.detail = detail


# --- the tag table ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TagEntry:
    """One row of the tag table (see the table's ``about``)."""

    key: str
    value: str  # an exact value, or "*"
    kind: str  # "object", "prefix" or "attribute"
    gsd: float
    phrase: str
    plural: str | None = None
    applies_to: tuple[str, ...] | None = None
    index: int = 0  # the row's position in the table (earlier objects win the focus)

    def text(self, value: str | None = None) -> str:
        """The phrase with ``{value}`` filled in (``_`` and ``:`` as spaces)."""
        if "{value}" not in self.phrase:
            return self.phrase
        v = (value if value is not None else self.value).replace("_", " ").replace(":", " ")
        return self.phrase.replace("{value}", v.strip())

    def plural_text(self, value: str | None = None) -> str:
        """The phrase for several objects: ``plural`` or the English rule on the last word."""
        if self.plural:
            return self.plural
        return pluralize(self.text(value))

    def applies(self, focus: TagEntry) -> bool:
        return self.applies_to is None or focus.key in self.applies_to


def pluralize(phrase: str) -> str:
    """``parking lot`` → ``parking lots``, ``bench`` → ``benches``, ``quarry`` → ``quarries``."""
    head, _, last = phrase.rpartition(" ")
    if last.endswith(("s", "sh", "ch", "x", "z")):
        last += "es"
    elif last.endswith("y") and len(last) > 1 and last[-2] not in "aeiou":
        last = last[:-1] + "ies"
    else:
        last += "s"
    return f"{head} {last}" if head else last


class TagTable:
    """The tag table: ``match(tags)`` → the entries the tags match (pure lookup)."""

    def __init__(self, entries: list[TagEntry], about: str = "") -> None:
        self.entries = list(entries)
        self.about = about
        self._exact: dict[tuple[str, str], TagEntry] = {}
        self._any: dict[str, TagEntry] = {}
        for e in self.entries:
            if e.kind not in KINDS:
                raise ValueError(f"tag table entry {e.key}={e.value}: kind {e.kind!r}")
            slot = (e.key, e.value)
            if e.value == "*":
                if e.key in self._any:
                    raise ValueError(f"tag table: {e.key}=* twice")
                self._any[e.key] = e
            else:
                if slot in self._exact:
                    raise ValueError(f"tag table: {e.key}={e.value} twice")
                self._exact[slot] = e
        self.keys = frozenset(e.key for e in self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> TagTable:
        entries = []
        for i, row in enumerate(doc["entries"]):
            applies = row.get("applies_to")
            entries.append(TagEntry(
                key=str(row["key"]), value=str(row["value"]), kind=str(row["kind"]),
                gsd=float(row["gsd"]), phrase=str(row["phrase"]), plural=row.get("plural"),
                applies_to=tuple(applies) if applies is not None else None, index=i))
        return cls(entries, str(doc.get("about", "")))

    @classmethod
    def load(cls, path: str | None = None) -> TagTable:
        """The table at ``path`` (any Beam filesystem), or the packaged SkyScript table."""
        if path is None:
            text = (resources.files("pipelines.recipes") / "data" / DEFAULT_TABLE).read_text(
                encoding="utf-8")
        else:
            with FileSystems.open(path, compression_type="uncompressed") as f:
                text = f.read().decode("utf-8")
        return cls.from_dict(json.loads(text))

    def lookup(self, key: str, value: str) -> TagEntry | None:
        """The entry of one tag: the exact value's, else the key's ``*``, else None."""
        return self._exact.get((key, value)) or self._any.get(key)

    def match(self, tags: Mapping[str, str]) -> list[TagEntry]:
        """Every entry ``tags`` match (at most one per tag), objects first, then prefixes,
        then attributes, each in table order."""
        found = [e for k, v in tags.items() if (e := self.lookup(k, v)) is not None]
        return sorted(found, key=lambda e: (KINDS.index(e.kind), e.index))

    def focus(self, tags: Mapping[str, str]) -> TagEntry | None:
        """The entry that names the object: the first ``object`` entry matched, else the
        first entry matched (an object tagged only ``surface=asphalt``), else None."""
        found = self.match(tags)
        return found[0] if found else None

    def caption_entries(self, tags: Mapping[str, str]
                        ) -> tuple[TagEntry | None, list[TagEntry], list[TagEntry]]:
        """``(focus, prefixes, attributes)`` the focus caption uses: the prefixes and
        attributes that apply to the focus object (all of them when there is none)."""
        found = self.match(tags)
        objects = [e for e in found if e.kind == "object"]
        focus = objects[0] if objects else None
        mods = [e for e in found if e.kind != "object" and (focus is None or e.applies(focus))]
        return (focus, [e for e in mods if e.kind == "prefix"],
                [e for e in mods if e.kind == "attribute"])

    def max_gsd(self, tags: Mapping[str, str]) -> float | None:
        """The coarsest GSD at which every entry of the focus caption is visible."""
        focus, prefixes, attributes = self.caption_entries(tags)
        used = ([focus] if focus else []) + prefixes + attributes
        return min(e.gsd for e in used) if used else None


# --- reading one extract ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OsmObject:
    osm_type: str  # "n", "w" or "r"
    osm_id: int
    version: int
    tags: dict[str, str]
    wkb: bytes  # WGS84 lon/lat
    focus: TagEntry
    max_gsd: float

    @property
    def source_id(self) -> str:
        return f"{self.osm_type}{self.osm_id}"

    @property
    def geometry(self) -> Any:
        return shapely.wkb.loads(self.wkb)

    @property
    def wkt(self) -> str:
        return self.geometry.wkt


@dataclasses.dataclass(frozen=True)
class OsmReject:
    osm_type: str
    osm_id: int
    reason: str  # one of REASONS
    detail: str
    tags: dict[str, str] | None = None

    @property
    def source_id(self) -> str:
        return f"{self.osm_type}{self.osm_id}"


@dataclasses.dataclass
class OsmRead:
    """What :func:`read_osm_objects` found in one file."""

    objects: list[OsmObject]
    rejects: list[OsmReject]
    counts: collections.Counter[str]


def is_area(tags: Mapping[str, str], focus: TagEntry) -> bool:
    """Whether a closed way with ``tags`` (focus entry ``focus``) is a polygon."""
    area = tags.get("area")
    if area == "no":
        return False
    if area == "yes" or (focus.key, tags.get(focus.key)) in AREA_TAGS:
        return True
    return focus.key not in LINEAR_KEYS and (focus.key, tags.get(focus.key)) not in LINEAR_TAGS


def sniff_suffix(data: bytes) -> str:
    """The file suffix pyosmium needs for ``data``: ``.osm.bz2``, ``.osm`` or ``.osm.pbf``."""
    if data[:3] == b"BZh":
        return ".osm.bz2"
    head = data[:512].lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"<"):
        return ".osm"
    return ".osm.pbf"


def suffix_of(path: str) -> str:
    name = path.lower()
    for s in SUFFIXES:
        if name.endswith(s):
            return ".osm.pbf" if s == ".pbf" else s
    raise OsmFileError(path, f"not an OSM file name (expected one of {', '.join(SUFFIXES)})")


def _local_copy(path: str, max_bytes: int) -> str:
    """A local temporary copy of ``path`` (any Beam filesystem), at most ``max_bytes``."""
    fd, tmp = tempfile.mkstemp(suffix=suffix_of(path), prefix="osm-")
    try:
        total = 0
        with os.fdopen(fd, "wb") as out, FileSystems.open(
                path, compression_type="uncompressed") as f:
            while chunk := f.read(16 << 20):
                total += len(chunk)
                if total > max_bytes:
                    raise OsmFileError(path, f"exceeds max_bytes {max_bytes}")
                out.write(chunk)
    except OsmFileError:
        os.unlink(tmp)
        raise
    except Exception as e:  # any filesystem's error
        os.unlink(tmp)
        raise OsmFileError(path, f"cannot be read: {type(e).__name__}: {e}") from e
    return tmp


def _single(geom: Any) -> Any:
    """A one-part MultiPolygon (libosmium's areas always are) as its Polygon."""
    if geom.geom_type == "MultiPolygon" and len(geom.geoms) == 1:
        return geom.geoms[0]
    return geom


def _checked(geom: Any, repair: bool) -> tuple[Any, str | None]:
    """``(geometry, None)`` when valid (or repaired), ``(None, why)`` when not."""
    if geom.is_empty:
        return None, "empty geometry"
    if geom.is_valid:
        return geom, None
    why = shapely.is_valid_reason(geom)
    if not repair:
        return None, why
    fixed = shapely.make_valid(geom)
    if geom.geom_type in ("Polygon", "MultiPolygon"):
        parts = getattr(fixed, "geoms", [fixed])
        polys = [p for g in parts for p in getattr(g, "geoms", [g])
                 if p.geom_type == "Polygon" and not p.is_empty]
        fixed = shapely.MultiPolygon(polys) if len(polys) > 1 else (polys[0] if polys else None)
    if fixed is None or fixed.is_empty or not fixed.is_valid:
        return None, f"{why} (not repairable)"
    return fixed, None


def iter_osm_objects(path: str, table: TagTable, counts: collections.Counter[str], *,
                     repair: bool = False) -> Iterator[OsmObject | OsmReject]:
    """The kept objects and per-object rejects of the local file ``path``, in file order
    (closed ways' polygons and leftovers at the end). Raises :class:`OsmFileError` when the
    file cannot be read; ``counts`` gets ``tagged``, ``unmatched``, ``kept``, per reason."""
    import osmium  # imported here: a worker that never reads OSM never loads libosmium

    if not os.path.isfile(path):
        raise OsmFileError(path, "no such file")
    wkb_factory = osmium.geom.WKBFactory()
    pending_ways: dict[int, tuple[int, dict[str, str], list[tuple[float, float]]]] = {}
    way_areas: dict[int, str] = {}  # closed way id → its assembled area as hex WKB
    pending_rels: dict[int, tuple[int, dict[str, str]]] = {}
    rel_areas: list[tuple[int, int, dict[str, str], bytes | str]] = []

    def made(osm_type: str, osm_id: int, version: int, tags: dict[str, str], geom: Any
             ) -> OsmObject | OsmReject:
        geom, why = _checked(geom, repair)
        if geom is None:
            return OsmReject(osm_type, osm_id, "invalid_geometry", str(why), tags)
        focus = table.focus(tags)
        assert focus is not None
        return OsmObject(osm_type, osm_id, version, tags, shapely.to_wkb(geom),
                         focus, table.max_gsd(tags) or focus.gsd)

    processor = (osmium.FileProcessor(path).with_locations().with_areas()
                 .with_filter(osmium.filter.EmptyTagFilter()))
    try:
        for o in processor:
            if o.is_area():
                tags = dict(o.tags)
                if o.from_way():
                    # not assembled (a bow-tie): the way's own ring is checked below
                    with contextlib.suppress(RuntimeError):
                        if o.orig_id() in pending_ways:
                            way_areas[o.orig_id()] = wkb_factory.create_multipolygon(o)
                    continue
                if o.orig_id() not in pending_rels:
                    continue
                version, tags = pending_rels.pop(o.orig_id())
                try:
                    rel_areas.append((o.orig_id(), version, tags,
                                      bytes.fromhex(wkb_factory.create_multipolygon(o))))
                except RuntimeError as e:
                    rel_areas.append((o.orig_id(), version, tags, f"area not assembled: {e}"))
                continue
            tags = dict(o.tags)
            counts["tagged"] += 1
            if not table.match(tags):
                counts["unmatched"] += 1
                continue
            if o.is_node():
                if not o.location.valid():
                    yield OsmReject("n", o.id, "invalid_geometry", "node without a location",
                                    tags)
                    continue
                yield made("n", o.id, o.version, tags, Point(o.location.lon, o.location.lat))
            elif o.is_way():
                refs = [n.ref for n in o.nodes]
                missing = [n.ref for n in o.nodes if not n.location.valid()]
                if missing:
                    yield OsmReject("w", o.id, "missing_nodes",
                                    f"{len(missing)} of {len(refs)} nodes not in the extract "
                                    f"(first: n{missing[0]})", tags)
                    continue
                coords = [(n.lon, n.lat) for n in o.nodes]
                focus = table.focus(tags)
                assert focus is not None
                if len(refs) >= 4 and refs[0] == refs[-1] and is_area(tags, focus):
                    pending_ways[o.id] = (o.version, tags, coords)
                    continue
                if len(set(coords)) < 2:
                    yield OsmReject("w", o.id, "invalid_geometry",
                                    f"a way of {len(set(coords))} distinct point(s)", tags)
                    continue
                yield made("w", o.id, o.version, tags, LineString(coords))
            elif o.is_relation():
                if tags.get("type") in ("multipolygon", "boundary"):
                    pending_rels[o.id] = (o.version, {k: v for k, v in tags.items()
                                                      if k != "type"})
                else:
                    counts["relation_not_area"] += 1
    except Exception as e:  # libosmium's errors on a truncated or foreign file
        raise OsmFileError(path, f"{type(e).__name__}: {e}") from e

    # closed ways: the assembled polygon, else the way's own ring (checked, maybe repaired)
    for way_id, (version, tags, coords) in pending_ways.items():
        area = way_areas.get(way_id)
        if area is not None:
            yield made("w", way_id, version, tags,
                       _single(shapely.wkb.loads(bytes.fromhex(area))))
            continue
        if len(set(coords)) < 3:
            yield OsmReject("w", way_id, "invalid_geometry",
                            f"a ring of {len(set(coords))} distinct point(s)", tags)
            continue
        yield made("w", way_id, version, tags, Polygon(coords))
    for rel_id, version, tags, area in rel_areas:
        if isinstance(area, str):
            yield OsmReject("r", rel_id, "invalid_geometry", area, tags)
            continue
        yield made("r", rel_id, version, tags, _single(shapely.wkb.loads(area)))
    for rel_id, (_version, tags) in pending_rels.items():
        yield OsmReject("r", rel_id, "missing_nodes",
                        "multipolygon not assembled: members missing from the extract", tags)


def read_osm_objects(path_or_bytes: str | bytes, table: TagTable | None = None, *,
                     repair: bool = False, max_bytes: int = DEFAULT_MAX_BYTES,
                     name: str | None = None) -> OsmRead:
    """The objects of one OSM file (a path on any Beam filesystem, or the file's bytes) whose
    tags match ``table`` (default: the packaged SkyScript table), the per-object rejects, and
    counts. Raises :class:`OsmFileError` (naming the file, ``name`` for bytes) when the file
    cannot be read; nothing of such a file is returned."""
    table = table or TagTable.load()
    tmp: str | None = None
    if isinstance(path_or_bytes, bytes | bytearray | memoryview):
        data = bytes(path_or_bytes)
        label = name or "<bytes>"
        if len(data) > max_bytes:
            raise OsmFileError(label, f"exceeds max_bytes {max_bytes}")
        fd, tmp = tempfile.mkstemp(suffix=sniff_suffix(data), prefix="osm-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        local = tmp
    else:
        label = str(path_or_bytes)
        if "://" in label:
            local = tmp = _local_copy(label, max_bytes)
        else:
            suffix_of(label)
            local = label
    counts: collections.Counter[str] = collections.Counter()
    objects: list[OsmObject] = []
    rejects: list[OsmReject] = []
    try:
        for item in iter_osm_objects(local, table, counts, repair=repair):
            if isinstance(item, OsmObject):
                objects.append(item)
                counts["kept"] += 1
            else:
                rejects.append(item)
                counts[item.reason] += 1
    except OsmFileError as e:
        raise OsmFileError(label, e.detail) from e
    finally:
        if tmp is not None:
            os.unlink(tmp)
    return OsmRead(objects, rejects, counts)


# --- records and the Beam source ----------------------------------------------------------


def osm_url(osm_type: str, osm_id: int) -> str:
    return f"https://www.openstreetmap.org/{TYPE_NAMES[osm_type]}/{osm_id}"


def object_record(obj: OsmObject, subset: str, path: str) -> dict[str, Any]:
    """The record of one kept object (see the module docstring)."""
    return new_record(
        subset, SOURCE, obj.source_id, osm_url(obj.osm_type, obj.osm_id),
        license="ODbL-1.0",
        osm_type=obj.osm_type,
        osm_id=obj.osm_id,
        tags=dict(obj.tags),
        extra=json.dumps({"osm_version": obj.version, "extract": path}, sort_keys=True),
        _geometry_wkb=obj.wkb,
        _focus={"key": obj.focus.key, "value": obj.tags.get(obj.focus.key, obj.focus.value)},
        _max_gsd=obj.max_gsd,
        # an object in two extracts (cut with complete_ways) is kept from the first path
        _order=f"{path}\x1f{obj.source_id}")


def _reject_record(source_id: str, subset: str, url: str | None, tags: Any) -> dict[str, Any]:
    return new_record(subset, SOURCE, source_id, url, tags=tags)


def file_outputs(path: str, subset: str, table: TagTable, *, repair: bool = False,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[list[dict[str, Any]],
                                                              list[dict[str, Any]]]:
    """``(records, reject rows)`` of one extract: the file's kept objects and per-object
    rejects, or one ``osm_file_unreadable`` row (source_id ``file:<path>``) and no record."""
    try:
        read = read_osm_objects(path, table, repair=repair, max_bytes=max_bytes)
    except OsmFileError as e:
        rec = _reject_record(f"file:{path}", subset, path, None)
        return [], [reject_row(rec, Reject(STAGE, e.reason, str(e)[:500]))]
    records = [object_record(o, subset, path) for o in read.objects]
    rejects = [reject_row(_reject_record(r.source_id, subset, osm_url(r.osm_type, r.osm_id),
                                         r.tags), Reject(STAGE, r.reason, r.detail[:500]))
               for r in read.rejects]
    return records, rejects


class _Expand(beam.DoFn):
    def process(self, pattern: str) -> Iterator[str]:
        found = sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
        if not found:
            raise FileNotFoundError(f"{pattern}: no OSM extract matches")
        yield from found


class _ReadFile(beam.DoFn):
    def __init__(self, subset: str, table: TagTable, repair: bool, max_bytes: int) -> None:
        self.subset = subset
        self.table = table
        self.repair = repair
        self.max_bytes = max_bytes

    def process(self, path: str) -> Iterator[Any]:
        records, rejects = file_outputs(path, self.subset, self.table, repair=self.repair,
                                        max_bytes=self.max_bytes)
        beam.metrics.Metrics.counter("ReadOsm", "objects").inc(len(records))
        for row in rejects:
            beam.metrics.Metrics.counter("ReadOsm", row["reason"]).inc()
            yield beam.pvalue.TaggedOutput(REJECTS, row)
        yield from records


class ReadOsm(beam.PTransform):
    """OSM extracts matching ``glob`` (comma-separated globs allowed, any Beam filesystem) →
    ``{"records": one record per kept object, "rejects": reject rows}``. Each file is one
    element (spread with a Reshuffle), so extracts are read in parallel; a glob that matches
    nothing fails the build with the glob named."""

    def __init__(self, glob: str, subset: str, table: TagTable | None = None, *,
                 repair: bool = False, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        super().__init__()
        self.globs = [g.strip() for g in str(glob).split(",") if g.strip()]
        if not self.globs:
            raise ValueError(f"no OSM glob in {glob!r}")
        self.subset = subset
        self.table = table or TagTable.load()
        self.repair = repair
        self.max_bytes = max_bytes

    def expand(self, pbegin: Any) -> Any:
        out = (
            pbegin
            | "Globs" >> beam.Create(self.globs)
            | "Expand" >> beam.ParDo(_Expand())
            | "Spread" >> beam.Reshuffle()
            | "Read" >> beam.ParDo(_ReadFile(self.subset, self.table, self.repair,
                                             self.max_bytes)).with_outputs(REJECTS, main=MAIN)
        )
        return {MAIN: out[MAIN], REJECTS: out[REJECTS]}
