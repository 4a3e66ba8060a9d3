"""A folder of captioned images (your own RS data) → input records.

Two layouts, detected in this order:

1. **A caption table** at the folder's top level: ``metadata.{jsonl,csv,parquet}`` (Hugging
   Face ``ImageFolder``'s layout) or ``captions.{jsonl,csv,parquet}``, or any table named with
   ``table=``. One row per image:

   ===========================  ================================================================
   column                       meaning
   ===========================  ================================================================
   ``file_name`` / ``path`` /   the image, relative to the folder (required)
   ``file`` / ``filename`` /
   ``image``
   ``caption`` / ``text`` /     the caption; ``captions`` (a list; JSON text in CSV) gives
   ``title``, ``captions``      several, the first one primary
   ``id`` / ``key`` /           the sample's id (default: the image path)
   ``sample_id``
   ``lat``/``latitude``,        WGS84 degrees of the image centre (optional)
   ``lon``/``lng``/``longitude``
   ``license``                  the image's license (optional)
   ``caption_kind``             one of ``schemas.CAPTION_KINDS`` (default ``human``)
   ===========================  ================================================================

   Other columns are kept verbatim in ``extra``.
2. **A ``.txt`` beside each image** (``a/b.jpg`` + ``a/b.txt``), the layout img2dataset and
   webdataset users know: each non-empty line of the ``.txt`` is a caption, the first primary.

A record's ``source`` is the folder's name (or ``source=``), its ``source_id`` the id column or
the image's relative path, so keys are stable. Its ``url`` is the image's full path: the fetch
stage reads it, allowed only inside the folder (``FetchConfig.allowed_prefixes``), so a
symlink that leaves the folder is refused there too.

Rejects at stage ``read`` (each a counted row, never a crash): ``path_outside_folder`` (an
absolute path, or ``..`` that leaves the folder), ``empty_caption``, ``caption_too_long``,
``bad_coordinates``, ``bad_caption_kind``, ``malformed_row`` (a table row that is not an object
or names no image), ``missing_caption`` (an image without its ``.txt``). A table that cannot be
read at all fails the build with its path named.

The folder is looked into **inside the pipeline**: the worker that reads the table finds it (or
walks the folder for ``.txt`` captions, ``FileSystems.match(folder/**)`` on a bucket), so the
launcher never lists or opens anything in a gs:// or s3:// folder; a local folder is checked to
exist on the launcher (cheap), so a typo fails before the pipeline starts.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import posixpath
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

import schemas
from pipelines.records import MAIN, REJECTS, Reject, new_record, reject_row
from pipelines.sinks.shards import join
from pipelines.sources.laion import MAX_CAPTION_CHARS, MAX_EXTRA_BYTES, _jsonable

STAGE = "read"
TABLE_NAMES = tuple(f"{stem}.{ext}" for stem in ("metadata", "captions")
                    for ext in ("jsonl", "csv", "parquet"))
PATH_NAMES = ("file_name", "path", "file", "filename", "image", "image_path")
CAPTION_NAMES = ("caption", "text", "title")
ID_NAMES = ("id", "key", "sample_id")
LAT_NAMES = ("lat", "latitude")
LON_NAMES = ("lon", "lng", "longitude")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".jp2")
DEFAULT_KIND = "human"


def _pick(row: dict[str, Any], names: tuple[str, ...]) -> str | None:
    lowered = {str(k).lower(): k for k in row}
    for n in names:
        if n in lowered:
            return lowered[n]
    return None


def find_table(root: str) -> str | None:
    """The caption table of ``root`` (see the module docstring), or None for .txt captions."""
    for name in TABLE_NAMES:
        path = join(root, name)
        if FileSystems.exists(path):
            return path
    return None


def safe_relpath(rel: Any) -> str | None:
    """``rel`` as a normalised relative POSIX path inside the folder, or None if it is absolute
    or leaves the folder (``..``), or is not a usable name at all."""
    if not isinstance(rel, str) or not rel.strip() or "\x00" in rel:
        return None
    rel = rel.strip().replace("\\", "/")
    if rel.startswith("/") or "://" in rel or (len(rel) > 1 and rel[1] == ":"):
        return None
    norm = posixpath.normpath(rel)
    if norm == ".." or norm.startswith("../") or norm == ".":
        return None
    return norm


def _captions(row: dict[str, Any]) -> list[str]:
    out: list[str] = []
    col = _pick(row, ("captions",))
    value = row.get(col) if col else None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = [value]
    if isinstance(value, (list, tuple)):
        out += [" ".join(str(c).split()) for c in value if isinstance(c, str)]
    col = _pick(row, CAPTION_NAMES)
    if col and isinstance(row.get(col), str):
        out.insert(0, " ".join(row[col].split()))
    return list(dict.fromkeys(c for c in out if c))  # unique, in order


def _coordinate(value: Any, limit: float) -> float | None | Reject:
    if value is None or value == "":
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return Reject(STAGE, "bad_coordinates", f"{value!r} is not a number")
    if not math.isfinite(x) or abs(x) > limit:
        return Reject(STAGE, "bad_coordinates", f"{value!r} is outside ±{limit:g}")
    return x


def row_to_record(row: Any, *, root: str, subset: str, source: str, order: str,
                  fallback_id: str, max_caption_chars: int = MAX_CAPTION_CHARS
                  ) -> dict[str, Any] | tuple[dict[str, Any], Reject]:
    """One table row (or .txt pair) → a record, or (record, Reject)."""
    if not isinstance(row, dict):
        rec = _base(subset, source, fallback_id, None, order)
        return rec, Reject(STAGE, "malformed_row", f"not an object: {str(row)[:80]!r}")
    path_col = _pick(row, PATH_NAMES)
    raw_path = row.get(path_col) if path_col else None
    id_col = _pick(row, ID_NAMES)
    raw_id = row.get(id_col) if id_col else None
    rel = safe_relpath(raw_path)
    source_id = str(raw_id) if raw_id not in (None, "") else (rel or fallback_id)
    record = _base(subset, source, source_id, join(root, rel) if rel else None, order)
    used = {c for c in (path_col, id_col, _pick(row, CAPTION_NAMES), _pick(row, ("captions",)),
                        _pick(row, LAT_NAMES), _pick(row, LON_NAMES), _pick(row, ("license",)),
                        _pick(row, ("caption_kind",))) if c}
    extra = {str(k): _jsonable(v) for k, v in row.items() if k not in used}
    record["extra"] = json.dumps(extra, sort_keys=True, ensure_ascii=False) if extra else None
    if raw_path in (None, ""):
        return record, Reject(STAGE, "malformed_row", "the row names no image file")
    if rel is None:
        record["url"] = str(raw_path)
        return record, Reject(STAGE, "path_outside_folder",
                              f"{str(raw_path)[:200]!r} is absolute or leaves the folder")
    if record["extra"] and len(record["extra"].encode()) > MAX_EXTRA_BYTES:
        record["extra"] = None
        return record, Reject(STAGE, "extra_too_large",
                              f"the other columns take more than {MAX_EXTRA_BYTES} bytes")
    caps = _captions(row)
    if caps:
        record["caption"], record["captions"] = caps[0], caps
    if not caps:
        return record, Reject(STAGE, "empty_caption", None)
    longest = max(len(c) for c in caps)
    if longest > max_caption_chars:
        return record, Reject(STAGE, "caption_too_long",
                              f"a caption has {longest} characters > {max_caption_chars}")
    kind_col = _pick(row, ("caption_kind",))
    kind = row.get(kind_col) if kind_col else None
    if kind not in (None, ""):
        if kind not in schemas.CAPTION_KINDS:
            return record, Reject(STAGE, "bad_caption_kind",
                                  f"{kind!r} is not one of {list(schemas.CAPTION_KINDS)}")
        record["caption_kind"] = kind
    lic = _pick(row, ("license",))
    if lic and row.get(lic) not in (None, ""):
        record["license"] = str(row[lic])
    lat_col, lon_col = _pick(row, LAT_NAMES), _pick(row, LON_NAMES)
    lat = _coordinate(row.get(lat_col) if lat_col else None, 90.0)
    lon = _coordinate(row.get(lon_col) if lon_col else None, 180.0)
    for v in (lat, lon):
        if isinstance(v, Reject):
            return record, v
    if (lat is None) != (lon is None):
        return record, Reject(STAGE, "bad_coordinates", "one of lat/lon is missing")
    record["lat"], record["lon"] = lat, lon
    return record


def _base(subset: str, source: str, source_id: str, url: str | None, order: str
          ) -> dict[str, Any]:
    return new_record(subset, source, source_id, url, license=None, caption=None,
                      caption_kind=DEFAULT_KIND, extra=None, _order=order)


def _open_text(path: str) -> str:
    with FileSystems.open(path, compression_type="uncompressed") as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from e


def table_rows(path: str) -> Iterator[tuple[str, Any]]:
    """(row label, row) of a caption table: a dict per row, or whatever a bad line holds."""
    low = path.lower()
    if low.endswith(".parquet"):
        try:
            with FileSystems.open(path, compression_type="uncompressed") as f:
                table = pq.read_table(io.BytesIO(f.read()))
        except Exception as e:  # name the file, whatever pyarrow raised
            raise ValueError(f"{path}: not a readable parquet table ({e})") from e
        for i, row in enumerate(table.to_pylist()):
            yield f"row {i}", row
    elif low.endswith(".csv"):
        reader = csv.DictReader(io.StringIO(_open_text(path), newline=""))
        for i, row in enumerate(reader):
            if None in row:  # more fields than the header names: a broken line
                yield f"row {i}", list(row.values())
            else:
                yield f"row {i}", row
    else:  # JSON lines
        for i, line in enumerate(_open_text(path).splitlines()):
            if not line.strip():
                continue
            try:
                yield f"line {i + 1}", json.loads(line)
            except ValueError:
                yield f"line {i + 1}", line


def _walk(root: str) -> list[str]:
    """Relative paths of every file under ``root`` (local: os.walk; buckets: ``**``)."""
    if "://" not in root:
        out = []
        for d, dirs, files in os.walk(root, followlinks=False):
            dirs.sort()
            out += [os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
                    for f in files]
        return sorted(out)
    prefix = root.rstrip("/") + "/"
    return sorted(m.path[len(prefix):] for m in
                  FileSystems.match([prefix + "**"])[0].metadata_list)


def txt_rows(root: str) -> Iterator[tuple[str, Any]]:
    """(label, row) for every image of a folder with ``.txt`` captions beside the images; an
    image without its ``.txt`` gives a row with ``captions`` None."""
    files = _walk(root)
    present = set(files)
    for rel in files:
        stem, ext = posixpath.splitext(rel)
        if ext.lower() not in IMAGE_EXTS:
            continue
        txt = stem + ".txt"
        captions = None
        if txt in present:
            captions = [ln for ln in _open_text(join(root, txt)).splitlines() if ln.strip()]
        yield rel, {"file_name": rel, "captions": captions}


class _ReadFolder(beam.DoFn):
    def __init__(self, root: str, table: str | None, subset: str, source: str,
                 max_caption_chars: int):
        self.root = root
        self.table = table
        self.subset = subset
        self.source = source
        self.max_caption_chars = max_caption_chars

    def process(self, _):
        # the layout is found here, on a worker: the launcher never looks inside a bucket
        table = self.table or find_table(self.root)
        rows = table_rows(table) if table else txt_rows(self.root)
        n = -1
        for n, (label, row) in enumerate(rows):
            out = row_to_record(row, root=self.root, subset=self.subset, source=self.source,
                                order=f"{n:012d}", fallback_id=label,
                                max_caption_chars=self.max_caption_chars)
            if not table and row.get("captions") is None:
                rec = out[0] if isinstance(out, tuple) else out
                out = rec, Reject(STAGE, "missing_caption",
                                  f"no {posixpath.splitext(label)[0]}.txt beside the image")
            if isinstance(out, tuple):
                rec, rej = out
                yield beam.pvalue.TaggedOutput(REJECTS, reject_row(rec, rej))
            else:
                yield out
        if n < 0:
            raise ValueError(f"{table or self.root}: no captioned images found (a caption "
                             f"table {', '.join(TABLE_NAMES)} or images with .txt captions)")


class ReadCaptionedFolder(beam.PTransform):
    """A folder of captioned images → records (main) and unusable rows (``rejects``).

    The layout is detected by the worker that reads the table (a standard table name looked
    up, or the folder walked for ``.txt`` captions), so a gs:// or s3:// folder is never
    looked into by the launcher; a local folder that does not exist still fails at
    construction, before the pipeline starts. The table is read by one worker, then the
    records are spread. ``table``: the caption table's path when it has no standard name
    (default: found by the worker).
    """

    def __init__(self, root: str, subset: str = "local", source: str | None = None,
                 table: str | None = None, max_caption_chars: int = MAX_CAPTION_CHARS):
        super().__init__()
        root = root.rstrip("/") or "/"
        if "://" not in root:
            root = os.path.abspath(root)
            if not os.path.isdir(root):
                raise FileNotFoundError(f"captioned folder {root} does not exist")
        self.root = root
        self.table = table
        self.subset = subset
        self.source = source or posixpath.basename(root.rstrip("/")) or subset
        self.max_caption_chars = max_caption_chars

    def expand(self, pbegin):
        out = (
            pbegin
            | "Once" >> beam.Create([None])
            | "Rows" >> beam.ParDo(_ReadFolder(self.root, self.table, self.subset, self.source,
                                               self.max_caption_chars))
            .with_outputs(REJECTS, main=MAIN)
        )
        # one worker read the table: spread the records over the workers for the image reads
        return {MAIN: out[MAIN] | "Spread" >> beam.Reshuffle(), REJECTS: out[REJECTS]}
