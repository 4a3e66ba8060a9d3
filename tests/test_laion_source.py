import json

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines.records import REJECTS, make_key
from pipelines.sources.laion import ColumnMap, ReadLaionParquet, read_row_group, resolve_columns


def write(path, table, row_group_size=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


@pytest.fixture
def files(tmp_path):
    laion = write(
        tmp_path / "laion2b" / "part-0.parquet",
        pa.table({
            "SAMPLE_ID": pa.array([10, 11, 12, 13], pa.int64()),
            "URL": ["http://a/1.jpg", "http://a/2.jpg", None, "http://a/4.jpg"],
            "TEXT": ["aerial  view\nof a port", "", "satellite image", "drone shot"],
            "WIDTH": [100, 200, 300, 400],
            "similarity": [0.3, float("nan"), 0.2, 0.1],
        }),
        row_group_size=2,
    )
    cc = write(
        tmp_path / "cc12m" / "part-0.parquet",
        pa.table({
            "url": ["http://b/1.jpg", "http://b/2.jpg"],
            "caption": pa.array([b"satellite map", b"bad \xff\xfe bytes"], pa.binary()),
        }),
    )
    return tmp_path, laion, cc


def test_detects_laion_and_lowercase_spellings(files):
    _, laion, cc = files
    cols = resolve_columns(str(laion), ["SAMPLE_ID", "URL", "TEXT"], ColumnMap())
    assert (cols.url, cols.caption, cols.id) == ("URL", "TEXT", "SAMPLE_ID")
    cols = resolve_columns(str(cc), ["url", "caption"], ColumnMap())
    assert (cols.url, cols.caption, cols.id) == ("url", "caption", None)


def test_missing_columns_is_a_clear_error():
    with pytest.raises(ValueError, match="--url_col"):
        resolve_columns("x.parquet", ["link_to_img", "TEXT"], ColumnMap(url_col="nope"))


def test_rows_become_records_with_provenance_and_rejects(files):
    _, laion, cc = files
    out = list(read_row_group(str(laion), 0, ColumnMap(), "pub11")) + list(
        read_row_group(str(laion), 1, ColumnMap(), "pub11")
    )
    ok = out[0]
    assert ok["source"] == "laion2b" and ok["source_id"] == "10"
    assert ok["key"] == make_key("laion2b", "10") and "." not in ok["key"]
    assert ok["caption"] == "aerial view of a port"  # whitespace normalised
    extra = json.loads(ok["extra"])
    assert extra == {"SAMPLE_ID": 10, "WIDTH": 100, "similarity": 0.3}
    assert json.loads(out[1][0]["extra"])["similarity"] is None  # NaN → null
    assert out[1][1].reason == "empty_caption"
    assert out[2][1].reason == "missing_url"
    assert out[3]["source_id"] == "13"  # row groups keep the file's row numbering
    cc_out = list(read_row_group(str(cc), 0, ColumnMap(), "pub11"))
    assert cc_out[0]["source_id"] == "part-0:0" and cc_out[0]["caption"] == "satellite map"
    assert cc_out[1][1].reason == "caption_not_utf8"


def test_beam_read_accounts_for_every_row(files):
    root, _, _ = files
    with TestPipeline() as p:
        out = p | ReadLaionParquet(str(root / "*" / "*.parquet"))
        assert_that(
            out.records | "K" >> beam.Map(lambda r: r["source_id"]),
            equal_to(["10", "13", "part-0:0"]),
        )
        assert_that(
            out[REJECTS] | "R" >> beam.Map(lambda r: (r["source_id"], r["stage"], r["reason"])),
            equal_to([("11", "read", "empty_caption"), ("12", "read", "missing_url"),
                      ("part-0:1", "read", "caption_not_utf8")]),
            label="rejects",
        )


def test_no_match_fails_before_the_pipeline(tmp_path):
    with pytest.raises(FileNotFoundError):
        ReadLaionParquet(str(tmp_path / "*.parquet"))


# --- hostile rows and files ------------------------------------------------------------------


DUP_DETAIL = "source_id '7' was already used by row 0 of part-0; ids must be unique per source"


def test_repeated_ids_keep_the_first_row_and_reject_the_rest(tmp_path):
    """Two rows with one SAMPLE_ID (and other images) would be kept under one key, and the
    shard would hold two members of one name: the later row is rejected as duplicate_id."""
    from pipelines.stages.unique_keys import UniqueKeys

    write(tmp_path / "laion" / "part-0.parquet", pa.table({
        "SAMPLE_ID": pa.array([7, 8, 7, 7], pa.int64()),
        "URL": ["http://a/first.jpg", "http://a/other.jpg", "http://a/second.jpg",
                "http://a/first.jpg"],
        "TEXT": ["aerial view one", "aerial view two", "aerial view three", "aerial view 4"],
    }), row_group_size=1)  # one row per row group: any worker order
    with TestPipeline() as p:
        read = p | ReadLaionParquet(str(tmp_path / "*" / "*.parquet"))
        out = read.records | UniqueKeys()
        assert_that(out.records | beam.Map(lambda r: (r["source_id"], r["url"])),
                    equal_to([("7", "http://a/first.jpg"), ("8", "http://a/other.jpg")]))
        assert_that(out[REJECTS] | "R" >> beam.Map(lambda r: (r["key"], r["reason"],
                                                                r["detail"], r["url"])),
                    equal_to([(make_key("laion", "7"), "duplicate_id", DUP_DETAIL, u)
                              for u in ("http://a/second.jpg", "http://a/first.jpg")]),
                    label="rejects")


def test_files_of_one_name_in_folders_of_one_name_get_distinct_keys(tmp_path):
    """cc12m-style files have no id column: source_id is <file>:<row>. Two part-0.parquet in
    two folders named cc12m used to give the same keys."""
    for batch in ("batch-a", "batch-b"):
        write(tmp_path / batch / "cc12m" / "part-0.parquet",
              pa.table({"url": [f"http://{batch}/1.jpg"], "caption": ["aerial view"]}))
    with TestPipeline() as p:
        out = p | ReadLaionParquet(str(tmp_path / "*" / "cc12m" / "*.parquet"))
        assert_that(out.records | beam.Map(lambda r: (r["source"], r["source_id"])),
                    equal_to([("cc12m", "batch-a/cc12m/part-0:0"),
                              ("cc12m", "batch-b/cc12m/part-0:0")]))


def test_caption_and_extra_caps(tmp_path):
    huge = "aerial view " * 1_000_000  # 12 MB
    write(tmp_path / "laion" / "part-0.parquet", pa.table({
        "SAMPLE_ID": pa.array([1, 2, 3, 4], pa.int64()),
        "URL": ["http://a/1.jpg", "http://a/2.jpg", "http://a/3.jpg", "http://a/4.jpg"],
        "TEXT": [huge, "aerial view " * 400, "aerial view", "aerial view"],
        "blob": ["x", "y", "z" * 200_000, "ok"],
    }))
    out = list(read_row_group(str(tmp_path / "laion" / "part-0.parquet"), 0, ColumnMap(),
                              "pub11"))
    assert out[0][1].reason == "caption_too_long" and "12000000 characters" in out[0][1].detail
    assert out[1][1].reason == "caption_too_long"  # 4800 characters > 4096
    assert out[2][1].reason == "extra_too_large" and out[2][0]["extra"] is None
    assert out[3]["caption"] == "aerial view"
    loose = ColumnMap(max_caption_chars=10_000, max_extra_bytes=10**6)
    out = list(read_row_group(str(tmp_path / "laion" / "part-0.parquet"), 0, loose, "pub11"))
    assert isinstance(out[1], dict) and isinstance(out[2], dict)


def test_a_file_that_is_not_parquet_is_named(tmp_path):
    write(tmp_path / "laion" / "part-0.parquet",
          pa.table({"URL": ["http://a/1.jpg"], "TEXT": ["aerial view"]}))
    bad = tmp_path / "laion" / "part-1.parquet"
    bad.write_bytes(b"<html>this is not parquet</html>")
    with (pytest.raises(Exception, match="part-1.parquet: not a readable parquet file"),
          TestPipeline() as p):
        _ = p | ReadLaionParquet(str(tmp_path / "*" / "*.parquet"))


# --- the glob is matched by the workers ------------------------------------------------------


def test_a_bucket_glob_is_not_listed_on_the_launcher(monkeypatch):
    """``INPUT='gs://bucket/laion/*.parquet'``: building the pipeline lists nothing (the
    workers match the glob), so a Dataflow dry run needs no bucket access."""
    from apache_beam.io.filesystems import FileSystems

    def refuse(*a, **k):
        raise AssertionError("the launcher listed a bucket")

    monkeypatch.setattr(FileSystems, "match", refuse)
    p = beam.Pipeline()
    _ = p | ReadLaionParquet("gs://rs-corpus-test/laion/*.parquet,s3://b/x/*.parquet")
    names = {t.unique_name for t in p.to_runner_api().components.transforms.values()}
    assert any(n.endswith("/Match") for n in names)


def test_a_glob_matching_nothing_fails_the_job_when_not_checked_first(tmp_path):
    with pytest.raises(Exception, match="no parquet files match"), TestPipeline() as p:
        _ = p | ReadLaionParquet(str(tmp_path / "*.parquet"), check_on_launcher=False)


def test_overlapping_globs_read_each_file_once(files):
    root, _, _ = files
    glob = f"{root}/*/*.parquet,{root}/laion2b/*.parquet"
    with TestPipeline() as p:
        out = p | ReadLaionParquet(glob, check_on_launcher=False)
        assert_that(out.records | beam.Map(lambda r: r["source_id"]),
                    equal_to(["10", "13", "part-0:0"]))
