"""Georeference stage: centre and bbox, UTM zones, seasons, grid positions, places with radii."""

from __future__ import annotations

import math

import apache_beam as beam
import pytest
import reverse_geocode
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from rasterio.warp import transform

from pipelines.records import REJECTS, Reject
from pipelines.stages.georef import (
    Georeference,
    centre_and_bbox,
    country_name,
    georeference,
    great_circle_km,
    grid_position,
    parse_acquired,
    place,
    season,
    towns,
    utm_zone,
)

EXMORE = (37.5318, -75.82299)  # a GeoNames town on Virginia's Eastern Shore


def _square(lat: float, lon: float, half: float = 0.01) -> list[list[float]]:
    return [[lon - half, lat - half], [lon + half, lat - half], [lon + half, lat + half],
            [lon - half, lat + half], [lon - half, lat - half]]


# --- UTM -----------------------------------------------------------------------------------


@pytest.mark.parametrize("lat, lon, zone", [
    (45.0, 15.0, "33N"),
    (37.53, -75.82, "18N"),
    (0.0, 0.5, "31N"),  # the equator counts as north
    (-33.87, 151.21, "56S"),  # Sydney
    (-23.55, -46.63, "23S"),  # Sao Paulo
    (-0.01, -78.5, "17S"),
    (10.0, 180.0, "60N"),  # 180 belongs to the last zone
    (10.0, -180.0, "1N"),
    # Norway: 56N..64N, 3E..12E is zone 32 (plain arithmetic says 31 below 6E)
    (60.0, 5.0, "32N"),
    (56.0, 3.0, "32N"),
    (64.0, 5.0, "31N"),  # the exception stops at 64N
    (55.99, 5.0, "31N"),
    (60.0, 2.99, "31N"),
    # Svalbard: 72N..84N, zones 31, 33, 35, 37 only
    (78.0, 8.0, "31N"),
    (78.0, 10.0, "33N"),  # plain arithmetic: 32
    (78.2, 20.0, "33N"),  # plain: 34
    (78.0, 25.0, "35N"),
    (78.0, 34.0, "37N"),  # plain: 36
    (78.0, 43.0, "38N"),  # east of the exception
    (71.9, 10.0, "32N"),  # south of it
])
def test_utm_zone(lat, lon, zone):
    assert utm_zone(lat, lon) == zone


def test_utm_zone_matches_the_utm_crs_it_names():
    """Outside the exceptions the zone is the one whose EPSG:326zz/327zz CRS puts the point
    within 3 degrees of the central meridian (easting within the zone's span)."""
    for lat, lon in [(45.0, 15.0), (-33.87, 151.21), (-23.55, -46.63), (51.5, -0.12)]:
        z = utm_zone(lat, lon)
        epsg = f"EPSG:{(32600 if z.endswith('N') else 32700) + int(z[:-1])}"
        (x,), _ = transform("EPSG:4326", epsg, [lon], [lat])
        assert 160_000 < x < 840_000, (lat, lon, z, x)


def test_utm_zone_outside_utm_and_off_globe():
    assert utm_zone(84.5, 10.0) is None  # UPS north
    assert utm_zone(-80.5, 10.0) is None  # UPS south
    with pytest.raises(ValueError):
        utm_zone(91.0, 0.0)
    with pytest.raises(ValueError):
        utm_zone(0.0, 181.0)
    with pytest.raises(ValueError):
        utm_zone(float("nan"), 0.0)


# --- seasons -------------------------------------------------------------------------------


def test_seasons_north_and_flipped_south():
    north = {1: "winter", 2: "winter", 3: "spring", 4: "spring", 5: "spring", 6: "summer",
             7: "summer", 8: "summer", 9: "autumn", 10: "autumn", 11: "autumn", 12: "winter"}
    flip = {"winter": "summer", "summer": "winter", "spring": "autumn", "autumn": "spring"}
    for month, name in north.items():
        assert season(month, 45.0) == name
        assert season(month, 0.0) == name  # the equator counts as north
        assert season(month, -33.9) == flip[name]
    assert season(6, -33.9) == "winter" and season(12, -33.9) == "summer"


@pytest.mark.parametrize("month", [0, 13, 6.5, "6", None])
def test_season_refuses_bad_months(month):
    with pytest.raises(ValueError):
        season(month, 10.0)


def test_parse_acquired():
    assert parse_acquired("2016-05-13T10:12:31Z").month == 5
    assert parse_acquired("2017-06-13T10:10:31").hour == 10
    assert parse_acquired("2016-05-13T23:30:00-02:00").day == 14  # converted to UTC
    assert parse_acquired("2016-05-13").month == 5
    assert parse_acquired("2016-05-13T10:12:31.123456Z").minute == 12
    assert parse_acquired("not a date") is None and parse_acquired(None) is None
    assert parse_acquired("2016-13-40") is None


# --- grid ----------------------------------------------------------------------------------


def test_grid_positions_cover_the_nine_cells():
    names = [["top left", "top", "top right"], ["left", "centre", "right"],
             ["bottom left", "bottom", "bottom right"]]
    for row in range(3):
        for col in range(3):
            box = [col * 100 + 40, row * 60 + 20, 20, 20]  # centre in cell (row, col)
            assert grid_position(box, 300, 180) == names[row][col]


def test_grid_position_edges_and_bad_boxes():
    assert grid_position([0, 0, 0, 0], 300, 300) == "top left"
    assert grid_position([290, 290, 20, 20], 300, 300) == "bottom right"  # centre on the edge
    assert grid_position([99, 0, 2, 2], 300, 300) == "top"  # centre at 100: the middle third
    assert grid_position([400, 10, 20, 20], 300, 300) is None  # centre outside the image
    assert grid_position([10, 10, -5, 5], 300, 300) is None
    assert grid_position([10, 10, 5], 300, 300) is None
    assert grid_position([10, 10, 5, 5], 0, 300) is None
    assert grid_position([10, "x", 5, 5], 300, 300) is None


# --- places --------------------------------------------------------------------------------


def test_a_point_two_km_from_a_town_is_near_it():
    lat = EXMORE[0] + 2.0 / 111.2  # 2 km north
    assert great_circle_km(lat, EXMORE[1], *EXMORE) == pytest.approx(2.0, abs=0.05)
    got = place(lat, EXMORE[1])
    assert got == {"city": "Exmore", "region": "Virginia", "country": "United States"}
    # the same point with a 1 km place radius: only the region
    assert place(lat, EXMORE[1], place_radius_km=1.0) == {
        "city": None, "region": "Virginia", "country": "United States"}


def test_mid_patagonia_gets_no_town():
    # the nearest GeoNames town (Perito Moreno) is ~106 km away: region and country only
    lat, lon = -47.5, -70.5
    i, km = towns().nearest(lat, lon)
    assert km > 100
    assert place(lat, lon) == {"city": None, "region": "Santa Cruz", "country": "Argentina"}
    # with the default radii the package's answer would have named that town
    assert reverse_geocode.search([(lat, lon)])[0]["city"] == towns().city[i]


def test_mid_ocean_gets_nothing_or_the_archives_country():
    lat, lon = 0.0, -30.0  # mid-Atlantic, 500 km from Fernando de Noronha
    assert towns().nearest(lat, lon)[1] > 150
    assert place(lat, lon) == {"city": None, "region": None, "country": None}
    assert place(lat, lon, country_code="BRA") == {"city": None, "region": None,
                                                   "country": "Brazil"}


def test_nearest_town_is_by_great_circle_not_degrees():
    """reverse_geocode's tree measures degrees: at 69N it answers a town 40 km away although
    one lies 19 km away; ours names the near one."""
    lat, lon = 69.23372698025052, 33.90336108883243
    theirs = reverse_geocode.search([(lat, lon)])[0]
    assert great_circle_km(lat, lon, theirs["latitude"], theirs["longitude"]) > 25
    got = place(lat, lon)
    assert got["city"] == "Polyarnyy" and got["country"] == "Russia"
    _, km = towns().nearest(lat, lon)
    assert km < 20


def test_the_archives_country_wins_at_a_border():
    strasbourg = (48.5734, 7.7521)
    assert place(*strasbourg)["city"] == "Strasbourg"
    assert place(*strasbourg, country_code="FRA")["city"] == "Strasbourg"
    # an archive that says Germany: the French town and region are not named
    assert place(*strasbourg, country_code="DEU") == {"city": None, "region": None,
                                                      "country": "Germany"}


def test_country_codes():
    assert country_name("CHE") == "Switzerland"
    assert country_name("USA") == "United States"
    assert country_name("us") == "United States"  # alpha-2 (GeoNames) too
    assert country_name("XKX") == "Kosovo"
    assert country_name("XYZ") is None and country_name("") is None and country_name(None) is None


# --- centre and bbox -----------------------------------------------------------------------


@pytest.mark.parametrize("crs, x0, y0, zone", [
    ("EPSG:32633", 500_000.0, 5_000_000.0, "33N"),
    ("EPSG:32756", 320_000.0, 6_260_000.0, "56S"),
])
def test_raster_centre_matches_rasterio(crs, x0, y0, zone):
    geo = {"crs": crs, "transform": [10.0, 0.0, x0, 0.0, -10.0, y0], "width": 120,
           "height": 120}
    lat, lon, bbox = centre_and_bbox({"_geo": geo})
    (elon,), (elat,) = transform(crs, "EPSG:4326", [x0 + 600.0], [y0 - 600.0])
    assert lat == pytest.approx(elat, abs=1e-9) and lon == pytest.approx(elon, abs=1e-9)
    west, south, east, north = bbox
    assert west < lon < east and south < lat < north
    # a 1.2 km patch: its bbox spans about 1.2 km
    assert great_circle_km(south, west, south, east) == pytest.approx(1.2, rel=0.05)
    out = georeference({"_geo": geo, "gsd_m": None, "acquired": "2017-06-13T10:10:31"})
    assert out["utm_zone"] == zone
    assert out["gsd_m"] == pytest.approx(10.0)
    assert out["season"] == ("summer" if zone.endswith("N") else "winter")


def test_footprint_centre_and_bbox():
    lat, lon, bbox = centre_and_bbox({"_footprint": _square(46.2, 6.1, 0.02)})
    assert (lat, lon) == (pytest.approx(46.2), pytest.approx(6.1))
    assert bbox == pytest.approx([6.08, 46.18, 6.12, 46.22])


def test_footprint_across_the_antimeridian():
    ring = [[179.99, -17.0], [-179.99, -17.0], [-179.99, -16.98], [179.99, -16.98]]
    lat, lon, bbox = centre_and_bbox({"_footprint": ring})
    assert lat == pytest.approx(-16.99)
    assert abs(abs(lon) - 180.0) < 1e-6
    west, _, east, _ = bbox
    assert west == pytest.approx(179.99) and east == pytest.approx(-179.99)  # west > east


@pytest.mark.parametrize("record, reason", [
    ({"_footprint": [[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]}, "footprint_invalid"),  # bowtie
    ({"_footprint": [[0, 0], [1, 1]]}, "footprint_invalid"),
    ({"_footprint": [[0, 0], [1, 1], [0, 0]]}, "footprint_invalid"),  # 3 points, closed
    ({"_footprint": [[0, 0], [1, 1], [2, 2], [0, 0]]}, "footprint_invalid"),  # zero area
    ({"_footprint": [[0, 0], [1, float("nan")], [1, 0]]}, "footprint_invalid"),
    ({"_footprint": "POLYGON((0 0, 1 1, 1 0, 0 0))"}, "footprint_invalid"),
    ({"_footprint": [[200, 0], [201, 1], [201, 0]]}, "off_globe"),
    ({"_footprint": [[0, 95], [1, 96], [1, 95]]}, "off_globe"),
    ({"_geo": {"crs": "EPSG:32633", "transform": [10, 0, 1e9, 0, -10, 1e9], "width": 120,
               "height": 120}}, "off_globe"),
    ({"_geo": {"crs": "EPSG:32633", "transform": [0, 0, 5e5, 0, 0, 5e6], "width": 120,
               "height": 120}}, "footprint_invalid"),
    ({"_geo": {"crs": "EPSG:32633", "transform": [10, 0, 5e5], "width": 120, "height": 120}},
     "footprint_invalid"),
    ({"_geo": {"crs": "EPSG:32633", "transform": [10, 0, 5e5, 0, -10, 5e6], "width": 0,
               "height": 120}}, "footprint_invalid"),
    ({"_geo": {"crs": "EPSG:999999", "transform": [10, 0, 5e5, 0, -10, 5e6], "width": 120,
               "height": 120}}, "footprint_invalid"),
])
def test_broken_locations_are_rejected(record, reason):
    got = georeference(record)
    assert isinstance(got, Reject)
    assert (got.stage, got.reason) == ("georeference", reason)


# --- whole records -------------------------------------------------------------------------


def _fmow_record(**over):
    lat = EXMORE[0] + 2.0 / 111.2
    rec = {
        "key": "k1", "source": "fmow-rgb", "source_id": "train/x/x_1/x_1_0_rgb",
        "acquired": "2016-06-13T15:12:31Z", "gsd_m": 0.52,
        "_footprint": _square(lat, EXMORE[1], 0.005),
        "_target_box": [10, 10, 50, 40], "_pixel_size": [300, 300],
        "_meta": {"country_code": "USA", "utm": "18S", "cloud_cover": 3,
                  "off_nadir_angle_dbl": 12.5},
    }
    rec.update(over)
    return rec


def test_fmow_record_is_georeferenced():
    out = georeference(_fmow_record())
    assert out["lat"] == pytest.approx(EXMORE[0] + 2.0 / 111.2)
    assert out["utm_zone"] == "18N"  # the hemisphere, not fMoW's MGRS band letter "S"
    assert out["season"] == "summer"
    assert (out["city"], out["region"], out["country"]) == ("Exmore", "Virginia",
                                                            "United States")
    assert out["cloud_cover"] == 3.0 and out["off_nadir_deg"] == 12.5
    assert out["target_position"] == "top left"
    assert out["gsd_m"] == 0.52
    assert out["_meta"]["utm"] == "18S"  # the input is not modified
    assert len(out["bbox"]) == 4 and all(math.isfinite(v) for v in out["bbox"])


def test_southern_record_has_flipped_season():
    fp = _square(-33.87, 151.21, 0.005)
    out = georeference(_fmow_record(_footprint=fp, _meta={"country_code": "AUS"}))
    assert out["season"] == "winter" and out["utm_zone"] == "56S"
    assert out["city"] == "Sydney" and out["country"] == "Australia"
    assert out["cloud_cover"] is None and out["off_nadir_deg"] is None


def test_a_malformed_pixel_size_gives_no_position():
    out = georeference(_fmow_record(_pixel_size=[300]))
    assert out["target_position"] is None and out["city"] == "Exmore"


def test_out_of_range_metadata_is_dropped():
    out = georeference(_fmow_record(_meta={"cloud_cover": 140, "off_nadir_angle_dbl": "x"}))
    assert out["cloud_cover"] is None and out["off_nadir_deg"] is None
    assert out["country"] == "United States"  # from the town: no archive country given


def test_record_without_location_passes_through():
    rec = {"key": "m", "source": "millionaid", "acquired": None, "_meta": {"hierarchy": ["a"]}}
    out = georeference(rec)
    assert {k: out[k] for k in ("lat", "lon", "bbox", "utm_zone", "season", "city", "region",
                                "country", "target_position")} == dict.fromkeys(
        ("lat", "lon", "bbox", "utm_zone", "season", "city", "region", "country",
         "target_position"))
    # a country code still names the country, and a date without a place gives no season
    out = georeference({**rec, "acquired": "2016-06-01", "_meta": {"country_code": "CHE"}})
    assert out["country"] == "Switzerland" and out["season"] is None


def test_beam_stage_routes_rejects():
    good = _fmow_record()
    off = _fmow_record(key="k2", _footprint=[[200, 0], [201, 1], [201, 0]])
    bad = _fmow_record(key="k3", _footprint=[[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]])
    with TestPipeline() as p:
        out = p | beam.Create([good, off, bad]) | Georeference()
        assert_that(out.records | "Cities" >> beam.Map(
            lambda r: (r["key"], r["city"], r["utm_zone"])),
            equal_to([("k1", "Exmore", "18N")]), label="records")
        assert_that(out[REJECTS] | "Reasons" >> beam.Map(
            lambda r: (r["key"], r["stage"], r["reason"])),
            equal_to([("k2", "georeference", "off_globe"),
                      ("k3", "georeference", "footprint_invalid")]), label="rejects")


def test_radii_must_be_ordered():
    with pytest.raises(ValueError):
        Georeference(place_radius_km=200.0, region_radius_km=100.0)
    with pytest.raises(ValueError):
        Georeference(place_radius_km=-1.0)
