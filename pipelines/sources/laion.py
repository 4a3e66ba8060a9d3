"""LAION-style web parquet (LAION-2B/400M/COCO, COYO, CC12M, ...) → input records.

Column mapping follows img2dataset: ``--url_col``/``--caption_col`` name the columns, and when
they are not given the common spellings are detected (``URL``/``url``, ``TEXT``/``text``/
``caption``...). Every other column is kept verbatim in the record's ``extra`` JSON.

The source name of a file is its parent folder (``pub11/laion2b-en/part-00000.parquet`` →
``laion2b-en``) unless ``source`` is forced. A row's ``source_id`` is its id column
(``SAMPLE_ID``, ``id``, ``key``...) when the file has one, else ``<file stem>:<row>``; the record
key derives from (source, source_id), so re-running on the same files gives the same keys.

Files are split by row group so a 10 GB parquet file is read by many workers, and read through
Beam's ``FileSystems`` so local paths, gs:// and s3:// all work.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import posixpath
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipelines.records import REJECTS, Reject, make_key, reject_row

URL_NAMES = ("url", "image_url", "img_url", "imageurl", "link")
CAPTION_NAMES = ("caption", "text", "alt", "alt_text", "alttext", "title", "top_caption")
ID_NAMES = ("sample_id", "id", "key", "uid", "image_id")
LICENSE_NAMES = ("license",)


@dataclasses.dataclass(frozen=True)
class ColumnMap:
    """Which input column plays which role; ``None`` means auto-detect."""

    url_col: str | None = None
    caption_col: str | None = None
    id_col: str | None = None
    source: str | None = None


def _detect(columns: list[str], wanted: str | None, names: tuple[str, ...]) -> str | None:
    if wanted:
        return wanted if wanted in columns else None
    lowered = {c.lower(): c for c in columns}
    for name in names:
        if name in lowered:
            return lowered[name]
    return None


@dataclasses.dataclass(frozen=True)
class ResolvedColumns:
    url: str
    caption: str
    id: str | None
    license: str | None


def resolve_columns(path: str, columns: list[str], cmap: ColumnMap) -> ResolvedColumns:
    """The columns of ``path`` to use; a file without a URL or caption column is unusable."""
    url = _detect(columns, cmap.url_col, URL_NAMES)
    caption = _detect(columns, cmap.caption_col, CAPTION_NAMES)
    missing = [
        role
        for role, col, flag in (("url", url, cmap.url_col), ("caption", caption, cmap.caption_col))
        if col is None
    ]
    if missing:
        raise ValueError(
            f"{path}: no {' or '.join(missing)} column among {columns}; "
            f"name it with --url_col / --caption_col"
        )
    return ResolvedColumns(
        url=url,
        caption=caption,
        id=_detect(columns, cmap.id_col, ID_NAMES),
        license=_detect(columns, None, LICENSE_NAMES),
    )


def source_name(path: str, cmap: ColumnMap) -> str:
    if cmap.source:
        return cmap.source
    parent = posixpath.basename(posixpath.dirname(path.replace("\\", "/")))
    return parent or posixpath.splitext(posixpath.basename(path))[0]


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def row_to_record(
    row: dict[str, Any],
    *,
    row_index: int,
    path: str,
    cols: ResolvedColumns,
    source: str,
    subset: str,
) -> dict[str, Any] | tuple[dict[str, Any], Reject]:
    """One parquet row → a record, or (record, Reject) when the row is unusable as text."""
    stem = posixpath.splitext(posixpath.basename(path))[0]
    raw_id = row.get(cols.id) if cols.id else None
    source_id = str(raw_id) if raw_id is not None else f"{stem}:{row_index}"
    url = row.get(cols.url)
    if isinstance(url, bytes):
        url = url.decode("utf-8", errors="replace")
    url = url.strip() if isinstance(url, str) else None
    raw_caption = row.get(cols.caption)
    record: dict[str, Any] = {
        "key": make_key(source, source_id),
        "subset": subset,
        "source": source,
        "source_id": source_id,
        "url": url or None,
        "license": str(row[cols.license]) if cols.license and row.get(cols.license) else None,
        "caption": None,
        "caption_kind": "alt_text",
        "extra": json.dumps(
            {
                k: _jsonable(v)
                for k, v in row.items()
                if k not in (cols.url, cols.caption)
            },
            sort_keys=True,
            ensure_ascii=False,
        ),
    }
    if isinstance(raw_caption, bytes):
        try:
            raw_caption = raw_caption.decode("utf-8")
        except UnicodeDecodeError as e:
            return record, Reject("read", "caption_not_utf8", f"{e.reason} at byte {e.start}")
    caption = " ".join(raw_caption.split()) if isinstance(raw_caption, str) else ""
    if not caption:
        return record, Reject("read", "empty_caption", None)
    record["caption"] = caption
    record["captions"] = [caption]
    if not record["url"]:
        return record, Reject("read", "missing_url", "the url column is null or empty")
    return record


def read_row_group(
    path: str, row_group: int, cmap: ColumnMap, subset: str
) -> Iterator[dict[str, Any] | tuple[dict[str, Any], Reject]]:
    with FileSystems.open(path) as f:
        pf = pq.ParquetFile(f)
        cols = resolve_columns(path, pf.schema_arrow.names, cmap)
        offset = sum(pf.metadata.row_group(i).num_rows for i in range(row_group))
        table: pa.Table = pf.read_row_group(row_group)
    source = source_name(path, cmap)
    for i, row in enumerate(table.to_pylist()):
        yield row_to_record(
            row, row_index=offset + i, path=path, cols=cols, source=source, subset=subset
        )


def expand_glob(pattern: str) -> list[str]:
    """All files matching ``pattern`` (comma-separated globs allowed), sorted; error if none."""
    paths: list[str] = []
    for pat in [p for p in pattern.split(",") if p.strip()]:
        for match in FileSystems.match([pat.strip()])[0].metadata_list:
            paths.append(match.path)
    if not paths:
        raise FileNotFoundError(f"no parquet files match {pattern!r}")
    return sorted(set(paths))


class _ListRowGroups(beam.DoFn):
    def __init__(self, cmap: ColumnMap):
        self.cmap = cmap

    def process(self, path: str):
        with FileSystems.open(path) as f:
            pf = pq.ParquetFile(f)
            resolve_columns(path, pf.schema_arrow.names, self.cmap)  # fail early, loudly
            n = pf.metadata.num_row_groups
        for rg in range(n):
            yield path, rg


class _ReadRowGroup(beam.DoFn):
    def __init__(self, cmap: ColumnMap, subset: str):
        self.cmap = cmap
        self.subset = subset
        self.rows = beam.metrics.Metrics.counter("read", "rows")

    def process(self, item: tuple[str, int]):
        path, rg = item
        for out in read_row_group(path, rg, self.cmap, self.subset):
            self.rows.inc()
            if isinstance(out, tuple):
                record, rej = out
                yield beam.pvalue.TaggedOutput(REJECTS, reject_row(record, rej))
            else:
                yield out


class ReadLaionParquet(beam.PTransform):
    """Glob of LAION-style parquet → records (main) and unusable rows (``rejects``).

    The glob is expanded at construction time so a typo fails before any worker starts.
    """

    def __init__(self, pattern: str, cmap: ColumnMap = ColumnMap(), subset: str = "pub11"):
        super().__init__()
        self.paths = expand_glob(pattern)
        self.cmap = cmap
        self.subset = subset

    def expand(self, pbegin):
        return (
            pbegin
            | "Files" >> beam.Create(self.paths)
            | "RowGroups" >> beam.ParDo(_ListRowGroups(self.cmap))
            | "Spread" >> beam.Reshuffle()
            | "Rows" >> beam.ParDo(_ReadRowGroup(self.cmap, self.subset)).with_outputs(
                REJECTS, main="records"
            )
        )
