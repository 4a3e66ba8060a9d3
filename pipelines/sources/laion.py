"""LAION-style web parquet (LAION-2B/400M/COCO, COYO, CC12M, ...) → input records.

Column mapping follows img2dataset: ``--url_col``/``--caption_col`` name the columns, and when
they are not given the common spellings are detected (``URL``/``url``, ``TEXT``/``text``/
``caption``...). Every other column is kept verbatim in the record's ``extra`` JSON.

The source name of a file is its parent folder (``pub11/laion2b-en/part-00000.parquet`` →
``laion2b-en``) unless ``source`` is forced. A row's ``source_id`` is its id column
(``SAMPLE_ID``, ``id``, ``key``...) when the file has one, else ``<file id>:<row>`` where the
file id is the file's stem, or its path below the inputs' common folder when two files of one
source share a stem (``a/x/part-0.parquet`` and ``b/x/part-0.parquet``); the record key derives
from (source, source_id), so re-running on the same files gives the same keys. Two rows of one
source with the same id value are both read; the stage :mod:`pipelines.stages.unique_keys`
keeps the first and rejects the others as ``duplicate_id``.

Rows are hostile input: a caption longer than ``max_caption_chars`` (after whitespace is
collapsed) is rejected as ``caption_too_long``, and a row whose other columns take more than
``max_extra_bytes`` of JSON as ``extra_too_large`` (both stage ``read``), so one 10 MB cell
cannot ride along to the shards. A file that is not parquet fails the build with its path named.

Files are split by row group so a 10 GB parquet file is read by many workers, and read through
Beam's ``FileSystems`` so local paths, gs:// and s3:// all work. The glob is matched **inside the
pipeline** (``fileio.MatchAll``), by the workers, then the footers are read spread over workers:
the launcher never lists a bucket (a 100k-file input is not listed by one process before the job
starts). A local glob is also checked on the launcher, which is cheap, so a typo fails before the
pipeline starts; a remote glob that matches nothing fails the job.
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
from apache_beam.io import fileio
from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystems import FileSystems

from pipelines.records import REJECTS, Reject, make_key, reject_row

URL_NAMES = ("url", "image_url", "img_url", "imageurl", "link")
CAPTION_NAMES = ("caption", "text", "alt", "alt_text", "alttext", "title", "top_caption")
ID_NAMES = ("sample_id", "id", "key", "uid", "image_id")
LICENSE_NAMES = ("license",)


#: caps on what one row may carry (characters of caption, bytes of the ``extra`` JSON)
MAX_CAPTION_CHARS = 4096
MAX_EXTRA_BYTES = 64 * 1024


@dataclasses.dataclass(frozen=True)
class ColumnMap:
    """Which input column plays which role; ``None`` means auto-detect. Also the row caps."""

    url_col: str | None = None
    caption_col: str | None = None
    id_col: str | None = None
    source: str | None = None
    max_caption_chars: int = MAX_CAPTION_CHARS
    max_extra_bytes: int = MAX_EXTRA_BYTES


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


def file_ids(paths: list[str], cmap: ColumnMap) -> dict[str, str]:
    """The id of each file in id-less sources' ``source_id`` (``<file id>:<row>``): its stem,
    unless another file of the same source has that stem too; then its path below the common
    folder of all inputs, without the extension (so no two files give the same keys)."""
    stems = {p: posixpath.splitext(posixpath.basename(p))[0] for p in paths}
    seen: dict[tuple[str, str], int] = {}
    for p in paths:
        k = (source_name(p, cmap), stems[p])
        seen[k] = seen.get(k, 0) + 1
    common = posixpath.dirname(posixpath.commonprefix(paths)) if len(paths) > 1 else ""
    out = {}
    for p in paths:
        if seen[(source_name(p, cmap), stems[p])] == 1:
            out[p] = stems[p]
        else:
            rel = p[len(common):].lstrip("/") if common else p
            out[p] = posixpath.splitext(rel)[0]
    return out


def row_to_record(
    row: dict[str, Any],
    *,
    row_index: int,
    path: str,
    cols: ResolvedColumns,
    source: str,
    subset: str,
    file_id: str | None = None,
    cmap: ColumnMap = ColumnMap(),
) -> dict[str, Any] | tuple[dict[str, Any], Reject]:
    """One parquet row → a record, or (record, Reject) when the row is unusable as text."""
    stem = file_id or posixpath.splitext(posixpath.basename(path))[0]
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
        "caption_kind": "web",
        "extra": json.dumps(
            {
                k: _jsonable(v)
                for k, v in row.items()
                if k not in (cols.url, cols.caption)
            },
            sort_keys=True,
            ensure_ascii=False,
        ),
        # input order (file, row): which of two rows sharing an id is the first
        "_order": f"{stem}\x1f{row_index:012d}",
    }
    extra_bytes = len(record["extra"].encode("utf-8", errors="replace"))
    if extra_bytes > cmap.max_extra_bytes:
        record["extra"] = None
        return record, Reject("read", "extra_too_large",
                              f"the other columns take {extra_bytes} bytes of JSON > "
                              f"{cmap.max_extra_bytes}")
    if isinstance(raw_caption, bytes):
        try:
            raw_caption = raw_caption.decode("utf-8")
        except UnicodeDecodeError as e:
            return record, Reject("read", "caption_not_utf8", f"{e.reason} at byte {e.start}")
    if isinstance(raw_caption, str) and len(raw_caption) > 8 * cmap.max_caption_chars:
        # no point collapsing whitespace in megabytes of text: it cannot fit whatever it holds
        return record, Reject("read", "caption_too_long",
                              f"caption has {len(raw_caption)} characters > "
                              f"{cmap.max_caption_chars}")
    caption = " ".join(raw_caption.split()) if isinstance(raw_caption, str) else ""
    if not caption:
        return record, Reject("read", "empty_caption", None)
    if len(caption) > cmap.max_caption_chars:
        return record, Reject("read", "caption_too_long",
                              f"caption has {len(caption)} characters > {cmap.max_caption_chars}")
    record["caption"] = caption
    record["captions"] = [caption]
    if not record["url"]:
        return record, Reject("read", "missing_url", "the url column is null or empty")
    return record


class UnreadableInputError(ValueError):
    """An input file that is not parquet at all (the whole file is unusable)."""


def _parquet_file(f: Any, path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(f)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise UnreadableInputError(
            f"{path}: not a readable parquet file ({type(e).__name__}: {e}); "
            "fix or remove it, or narrow --input") from e


def read_row_group(
    path: str, row_group: int, cmap: ColumnMap, subset: str, file_id: str | None = None
) -> Iterator[dict[str, Any] | tuple[dict[str, Any], Reject]]:
    with FileSystems.open(path) as f:
        pf = _parquet_file(f, path)
        cols = resolve_columns(path, pf.schema_arrow.names, cmap)
        offset = sum(pf.metadata.row_group(i).num_rows for i in range(row_group))
        try:
            table: pa.Table = pf.read_row_group(row_group)
        except (pa.ArrowException, OSError) as e:
            raise UnreadableInputError(
                f"{path}: row group {row_group} cannot be read ({type(e).__name__}: {e})"
            ) from e
    source = source_name(path, cmap)
    for i, row in enumerate(table.to_pylist()):
        yield row_to_record(
            row, row_index=offset + i, path=path, cols=cols, source=source, subset=subset,
            file_id=file_id, cmap=cmap,
        )


def patterns(pattern: str) -> list[str]:
    """The globs of ``pattern`` (comma-separated globs allowed)."""
    return [p.strip() for p in pattern.split(",") if p.strip()]


def expand_glob(pattern: str) -> list[str]:
    """All files matching ``pattern`` (comma-separated globs allowed), sorted; error if none."""
    paths: list[str] = []
    for pat in patterns(pattern):
        try:
            found = FileSystems.match([pat])[0].metadata_list
        except BeamIOError:  # a missing folder, on some filesystems
            found = []
        paths += [m.path for m in found]
    if not paths:
        raise FileNotFoundError(f"no parquet files match {pattern!r}")
    return sorted(set(paths))


def files_with_ids(paths: list[str], pattern: str, cmap: ColumnMap
                   ) -> Iterator[tuple[str, str]]:
    """(path, file id) of every matched file, sorted, each once (globs may overlap); error if
    none. The file ids need every path at once: :func:`file_ids`."""
    paths = sorted(set(paths))
    if not paths:
        raise FileNotFoundError(f"no parquet files match {pattern!r}")
    ids = file_ids(paths, cmap)
    for p in paths:
        yield p, ids[p]


class _ListRowGroups(beam.DoFn):
    def __init__(self, cmap: ColumnMap):
        self.cmap = cmap

    def process(self, item: tuple[str, str]):
        path, file_id = item
        with FileSystems.open(path) as f:
            pf = _parquet_file(f, path)
            resolve_columns(path, pf.schema_arrow.names, self.cmap)  # fail early, loudly
            n = pf.metadata.num_row_groups
        for rg in range(n):
            yield path, file_id, rg


class _ReadRowGroup(beam.DoFn):
    def __init__(self, cmap: ColumnMap, subset: str):
        self.cmap = cmap
        self.subset = subset
        self.rows = beam.metrics.Metrics.counter("read", "rows")

    def process(self, item: tuple[str, str, int]):
        path, file_id, rg = item
        for out in read_row_group(path, rg, self.cmap, self.subset, file_id):
            self.rows.inc()
            if isinstance(out, tuple):
                record, rej = out
                yield beam.pvalue.TaggedOutput(REJECTS, reject_row(record, rej))
            else:
                yield out


class ReadLaionParquet(beam.PTransform):
    """Glob of LAION-style parquet → records (main) and unusable rows (``rejects``).

    The glob is matched by the workers (``fileio.MatchAll``); the file list is gathered once
    (the file ids depend on every path) and spread again before the footers are read.
    ``check_on_launcher``: also match the glob at construction, so a typo fails before the
    pipeline starts (default: for local globs only; a bucket is never listed by the launcher).
    """

    def __init__(self, pattern: str, cmap: ColumnMap = ColumnMap(), subset: str = "pub11",
                 check_on_launcher: bool | None = None):
        super().__init__()
        self.pattern = pattern
        self.patterns = patterns(pattern)
        self.cmap = cmap
        self.subset = subset
        if check_on_launcher is None:
            check_on_launcher = not any("://" in p for p in self.patterns)
        if check_on_launcher:
            expand_glob(pattern)

    def expand(self, pbegin):
        return (
            pbegin
            | "Globs" >> beam.Create(self.patterns)
            | "Match" >> fileio.MatchAll(fileio.EmptyMatchTreatment.ALLOW)
            | "Paths" >> beam.Map(lambda m: m.path)
            | "AllPaths" >> beam.combiners.ToList()
            | "Files" >> beam.FlatMap(files_with_ids, self.pattern, self.cmap)
            | "SpreadFiles" >> beam.Reshuffle()
            | "RowGroups" >> beam.ParDo(_ListRowGroups(self.cmap))
            | "Spread" >> beam.Reshuffle()
            | "Rows" >> beam.ParDo(_ReadRowGroup(self.cmap, self.subset)).with_outputs(
                REJECTS, main="records"
            )
        )
