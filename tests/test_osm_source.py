"""OSM source (pipelines/sources/osm.py), the tag table and the OSM captions, on small extracts
written with pyosmium's SimpleWriter."""

from __future__ import annotations

import json
from pathlib import Path

import apache_beam as beam
import osmium
import pytest
import shapely.wkb
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from osmium.osm.mutable import Node, Relation, Way

from pipelines.records import make_key
from pipelines.sources import osm
from pipelines.sources.osm import OsmFileError, ReadOsm, TagTable, read_osm_objects
from pipelines.stages.osm_captions import focus_caption, join_and, multi_caption

BUILDING = [(8.001, 47.001), (8.002, 47.001), (8.002, 47.002), (8.001, 47.002)]
ROAD = [(8.003, 47.003), (8.004, 47.0035), (8.005, 47.003)]
LAKE = [(8.010, 47.010), (8.012, 47.010), (8.012, 47.012), (8.010, 47.012)]
BOWTIE = [(8.02, 47.02), (8.03, 47.03), (8.03, 47.02), (8.02, 47.03)]
TOWER = (8.0071234, 47.0065432)


@pytest.fixture(scope="module")
def table() -> TagTable:
    return TagTable.load()


def write_extract(path: Path) -> Path:
    """Every case the reader must handle, in one file."""
    with osmium.SimpleWriter(str(path)) as w:
        w.add_node(Node(id=1, location=TOWER, version=2,
                        tags={"power": "tower", "ref": "A12"}))
        w.add_node(Node(id=2, location=(8.0, 47.0), version=1,
                        tags={"addr:housenumber": "12", "name": "X"}))  # only unknown tags
        for base, pts in ((10, BUILDING), (20, ROAD), (30, LAKE), (40, BOWTIE)):
            for i, (x, y) in enumerate(pts):
                w.add_node(Node(id=base + i, location=(x, y), version=1))
        w.add_way(Way(id=100, nodes=[10, 11, 12, 13, 10], version=3,
                      tags={"building": "yes", "roof:shape": "gabled"}))
        w.add_way(Way(id=101, nodes=[20, 21, 22], version=1,
                      tags={"highway": "residential", "surface": "asphalt", "lanes": "2"}))
        w.add_way(Way(id=102, nodes=[20, 21, 999], version=1,  # node 999: cut by the extract
                      tags={"highway": "service"}))
        w.add_way(Way(id=103, nodes=[30, 31, 32, 33, 30], version=1))  # untagged member
        w.add_way(Way(id=104, nodes=[40, 41, 42, 43, 40], version=1,
                      tags={"building": "yes"}))  # self-intersecting
        w.add_way(Way(id=105, nodes=[10, 11, 12, 13, 10], version=1,
                      tags={"highway": "footway", "area": "no"}))  # a closed line
        w.add_relation(Relation(id=200, members=[("w", 103, "outer")], version=4,
                                tags={"type": "multipolygon", "natural": "water",
                                      "water": "lake"}))
        w.add_relation(Relation(id=201, members=[("w", 777, "outer")], version=1,
                                tags={"type": "multipolygon", "landuse": "farmland"}))
    return path


@pytest.fixture(scope="module")
def extracts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("osm")
    # .osm.bz2 is a documented input: the pinned pyosmium wheels ship bzip2 support
    out = {"pbf": write_extract(d / "a.osm.pbf"), "xml": write_extract(d / "b.osm"),
           "bz2": write_extract(d / "c.osm.bz2")}
    data = out["pbf"].read_bytes()
    (d / "bad").mkdir()
    out["truncated"] = d / "bad" / "t.osm.pbf"
    out["truncated"].write_bytes(data[: len(data) // 2])
    return out


def by_id(read: osm.OsmRead) -> dict[str, osm.OsmObject]:
    return {o.source_id: o for o in read.objects}


# --- the tag table ------------------------------------------------------------------------


def test_table_schema_and_size(table: TagTable) -> None:
    doc = json.loads((Path(osm.__file__).parents[1] / "recipes" / "data"
                      / osm.DEFAULT_TABLE).read_text())
    assert "about" in doc and "gsd" in doc["about"]
    assert len(table) >= 300
    assert {e.kind for e in table.entries} == set(osm.KINDS)
    assert {e.gsd for e in table.entries} <= set(osm.GSD_CLASSES)


def test_table_match(table: TagTable) -> None:
    found = table.match({"building": "yes", "roof:shape": "gabled", "name": "x"})
    assert [(e.key, e.value, e.kind) for e in found] == [
        ("building", "*", "object"), ("roof:shape", "gabled", "prefix")]
    # an exact value beats "*"; an unknown value of a known key falls back to "*"
    assert table.lookup("building", "house").phrase == "house"
    assert table.lookup("building", "weird_value").value == "*"
    assert table.lookup("addr:housenumber", "12") is None
    assert table.match({"addr:street": "x"}) == []
    assert table.lookup("leisure", "pitch").gsd == 1
    assert table.lookup("man_made", "storage_tank") is not None
    assert table.lookup("amenity", "parking").phrase == "parking lot"
    assert table.max_gsd({"building": "yes", "roof:shape": "gabled"}) == 0.6
    assert table.max_gsd({"landuse": "farmland"}) == 10


# --- captions -----------------------------------------------------------------------------


def test_focus_caption(table: TagTable) -> None:
    assert focus_caption({"building": "yes", "roof:shape": "gabled"}, table) == \
        "gabled roof building"
    assert focus_caption({"highway": "road", "surface": "asphalt"}, table) == \
        "road with surface of asphalt"
    assert focus_caption({"highway": "residential", "surface": "asphalt", "lanes": "2"},
                         table) == "residential road with surface of asphalt and lanes of 2"
    assert focus_caption({"power": "minor_line", "cables": "3", "voltage": "16000"}, table) \
        == "power minor line with cables of 3 and voltage of 16000"
    assert focus_caption({"leisure": "pitch", "sport": "tennis"}, table) == "tennis pitch"
    # a prefix that does not apply to the focus is left out
    assert focus_caption({"building": "yes", "sport": "tennis"}, table) == "building"
    assert focus_caption({"surface": "gravel"}, table) == "surface of gravel"
    assert focus_caption({"name": "x"}, table) == ""


def test_multi_caption(table: TagTable) -> None:
    others = [{"highway": "road"}] * 3 + [{"amenity": "parking"}] * 2 + [{"name": "x"}]
    assert multi_caption({"building": "yes", "roof:shape": "gabled"}, others, table) == \
        "gabled roof building, surrounded by 3 roads and 2 parking lots"
    assert multi_caption({"power": "pole"}, [{"power": "minor_line", "cables": "3"}], table) \
        == "power pole, surrounded by power minor line with cables of 3"
    assert multi_caption({"power": "pole"}, [], table) == "power pole"
    assert join_and(["a", "b", "c"]) == "a, b and c"


# --- reading ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["pbf", "xml", "bz2"])
def test_read_objects(extracts: dict[str, Path], table: TagTable, fmt: str) -> None:
    read = read_osm_objects(str(extracts[fmt]), table)
    objs = by_id(read)
    assert set(objs) == {"n1", "w100", "w101", "w105", "r200"}

    tower = objs["n1"]
    assert tower.osm_type == "n" and tower.version == 2
    assert tower.focus.key == "power" and tower.max_gsd == 0.6
    pt = tower.geometry
    assert (pt.x, pt.y) == pytest.approx(TOWER, abs=1e-7)  # OSM stores 1e-7 degrees

    building = objs["w100"]
    assert building.version == 3 and building.tags["roof:shape"] == "gabled"
    poly = building.geometry
    assert poly.geom_type == "Polygon" and poly.is_valid
    assert set(poly.exterior.coords) == set(BUILDING)

    road = objs["w101"]
    assert road.geometry.geom_type == "LineString"
    assert list(road.geometry.coords) == ROAD
    assert road.focus.value == "residential"

    assert objs["w105"].geometry.geom_type == "LineString"  # area=no: stays a line

    lake = objs["r200"]
    assert lake.osm_type == "r" and lake.version == 4 and "type" not in lake.tags
    assert lake.focus.key == "water" and lake.geometry.geom_type == "Polygon"
    assert set(lake.geometry.exterior.coords) == set(LAKE)
    assert lake.wkt.startswith("POLYGON")

    reasons = sorted((r.source_id, r.reason) for r in read.rejects)
    assert reasons == [("r201", "missing_nodes"), ("w102", "missing_nodes"),
                       ("w104", "invalid_geometry")]
    assert "Self-intersection" in next(r.detail for r in read.rejects if r.osm_id == 104)
    assert read.counts["unmatched"] == 1  # n2: tags, none visible
    assert read.counts["kept"] == 5


def test_repair_keeps_bowtie(extracts: dict[str, Path], table: TagTable) -> None:
    read = read_osm_objects(str(extracts["pbf"]), table, repair=True)
    bowtie = by_id(read)["w104"].geometry
    assert bowtie.is_valid and bowtie.geom_type == "MultiPolygon"
    assert {r.source_id for r in read.rejects} == {"r201", "w102"}


def test_bytes_input(extracts: dict[str, Path], table: TagTable) -> None:
    for fmt in ("pbf", "xml"):
        read = read_osm_objects(extracts[fmt].read_bytes(), table)
        assert set(by_id(read)) == {"n1", "w100", "w101", "w105", "r200"}


def test_unreadable_files(extracts: dict[str, Path], tmp_path: Path, table: TagTable) -> None:
    truncated = str(extracts["truncated"])
    with pytest.raises(OsmFileError) as e:
        read_osm_objects(truncated, table)
    assert truncated in str(e.value)
    with pytest.raises(OsmFileError, match="no such file"):
        read_osm_objects(str(tmp_path / "nope.osm.pbf"), table)
    junk = tmp_path / "junk.osm"
    junk.write_text("<html>not osm</html>")
    with pytest.raises(OsmFileError, match="junk.osm"):
        read_osm_objects(str(junk), table)
    with pytest.raises(OsmFileError, match="max_bytes"):
        read_osm_objects(extracts["pbf"].read_bytes(), table, max_bytes=10, name="x.osm.pbf")
    with pytest.raises(OsmFileError, match="not an OSM file name"):
        read_osm_objects(str(tmp_path / "a.txt"), table)


def test_file_outputs_reject_rows(extracts: dict[str, Path], table: TagTable) -> None:
    records, rejects = osm.file_outputs(str(extracts["truncated"]), "skyscript", table)
    assert records == []
    assert [(r["stage"], r["reason"]) for r in rejects] == [("read", "osm_file_unreadable")]
    assert str(extracts["truncated"]) in rejects[0]["detail"]


def test_read_osm_beam(extracts: dict[str, Path], table: TagTable) -> None:
    pbf_dir = extracts["pbf"].parent
    glob = f"{pbf_dir}/a.osm.pbf,{extracts['truncated']}"
    with TestPipeline() as p:
        out = p | ReadOsm(glob, "skyscript", table)
        records = out["records"] | "Rec" >> beam.Map(
            lambda r: (r["key"], r["source"], r["source_id"], r["_focus"]["key"],
                       r["_max_gsd"], shapely.wkb.loads(r["_geometry_wkb"]).geom_type))
        rejects = out["rejects"] | "Rej" >> beam.Map(lambda r: (r["source_id"], r["stage"],
                                                                r["reason"]))
        assert_that(records, equal_to([
            (make_key("osm", "n1"), "osm", "n1", "power", 0.6, "Point"),
            (make_key("osm", "w100"), "osm", "w100", "building", 0.6, "Polygon"),
            (make_key("osm", "w101"), "osm", "w101", "highway", 0.6, "LineString"),
            (make_key("osm", "w105"), "osm", "w105", "highway", 0.6, "LineString"),
            (make_key("osm", "r200"), "osm", "r200", "water", 10.0, "Polygon"),
        ]), label="records")
        assert_that(rejects, equal_to([
            ("r201", "read", "missing_nodes"), ("w102", "read", "missing_nodes"),
            ("w104", "read", "invalid_geometry"),
            (f"file:{extracts['truncated']}", "read", "osm_file_unreadable"),
        ]), label="rejects")


def test_read_osm_empty_glob_fails(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="no OSM extract"), TestPipeline() as p:
        _ = p | ReadOsm(str(tmp_path / "*.osm.pbf"), "skyscript")


def test_remote_copy(extracts: dict[str, Path], table: TagTable) -> None:
    """The copy made for gs:// / s3:// paths (FileSystems), here from a local path."""
    local = osm._local_copy(str(extracts["pbf"]), osm.DEFAULT_MAX_BYTES)
    try:
        assert local.endswith(".osm.pbf")
        assert Path(local).read_bytes() == extracts["pbf"].read_bytes()
    finally:
        Path(local).unlink()
    with pytest.raises(OsmFileError, match="max_bytes"):
        osm._local_copy(str(extracts["pbf"]), 10)
