"""The one sink every recipe ends in: webdataset shards, their parquet index, rejects,
duplicates, the clip-retrieval embeddings folder (when asked), and the build's documents.

Layout of a build folder (``OUTPUT``), for every subset ``S`` the build holds::

    shards/S-NNNNN.tar            {key}.jpg, {key}.txt (the primary caption), {key}.json (the row)
    index/S-NNNNN.parquet         the shard's rows, in the same order (schemas.SAMPLE_SCHEMA)
    rejects/S-NNNNN.parquet       reject rows (schemas.REJECT_SCHEMA)
    duplicates/S-NNNNN.parquet    duplicate rows (schemas.DUPLICATE_SCHEMA)
    subsets/S/stats.json          the subset's accounting (checked), sizes.json, manifest.json
    stats.json, sizes.json, manifest.json, shards/sizes.json   merged over every subset present

A build writes the subsets it was given and then merges the top-level documents from every
``subsets/*/`` folder, so a subset rebuilt alone leaves the others' files, and the merged
documents, correct. ``stats.json`` is written last: its presence means the build completed.

Determinism: a sample's shard is the rank of ``stable_hash(key) % n`` among the non-empty
buckets (``n`` derived from the kept count), so shard numbers are contiguous from 0 and a
``{00000..N}`` brace range names every shard; keys are sorted inside a shard, and tar members
carry a fixed mtime, uid/gid 0 and empty owner names, so the same input and config give
byte-identical shards and index files on any runner. Each file is written under a temporary
name and renamed, so no reader ever sees half a shard. A key that appears twice among the kept
rows fails the build (webdataset cannot read a tar with two members of one name).

Memory: a shard's members are only known once every kept row is (the shard count comes from
the kept count), so the shard GroupByKey holds the whole subset. A build into a local folder
therefore **spills** the picture bytes on the way in: each bundle appends its rows' ``_image``
bytes to one file under ``{output}/_spill/{subset}/`` and passes on a reference (file, offset,
length), the shard writer reads them back, and the folder is removed when the subset
completes. The runner then buffers rows of ~1 KB instead of ~30 KB pictures. A build into a
bucket (``gs://``, ``s3://``: a cluster) leaves the pictures in the rows: the runner's
shuffle holds them on disk, and ranged reads of a bucket per picture would cost more. Tars
are written straight to their (temporary) file, never whole in memory.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import math
import os
import posixpath
import shutil
import tarfile
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystems import FileSystems

import schemas
from pipelines.records import public, stable_hash

log = logging.getLogger(__name__)

#: 2000-01-01T00:00:00Z: a fixed, plausible mtime for every tar member
TAR_MTIME = 946684800
#: the folders that hold one file set per subset, named ``{subset}-NNNNN.*``
SUBSET_FOLDERS = ("shards", "index", "rejects", "duplicates")
#: the build documents: per subset under ``subsets/{subset}/``, merged at the top level
DOCUMENTS = ("stats.json", "sizes.json", "manifest.json")


class AccountingError(RuntimeError):
    """input != kept + rejected + duplicates, a shard that does not hold what was kept, or a
    repeated key: some record vanished, was counted twice or would be unreadable."""


def join(*parts: str) -> str:
    return FileSystems.join(*parts) if "://" in parts[0] else posixpath.join(*parts)


def write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary name + rename (any Beam filesystem)."""
    write_atomic_stream(path, lambda f: f.write(data))


class _Counted:
    """A write-only stream that counts what passes through it."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.size = 0

    def write(self, data: bytes) -> int:
        self.f.write(data)
        self.size += len(data)
        return len(data)


def write_atomic_stream(path: str, write: Callable[[Any], Any]) -> int:
    """``write(stream)`` into ``path`` via a temporary name + rename (any Beam filesystem);
    the bytes written."""
    tmp = f"{path}.incomplete-{uuid.uuid4().hex[:8]}"
    with FileSystems.create(tmp) as f:
        counted = _Counted(f)
        write(counted)
    _replace(tmp, path)
    return counted.size


def _replace(tmp: str, path: str) -> None:
    try:  # a retried bundle's attempt may have written (or be removing) it concurrently
        if FileSystems.exists(path):
            FileSystems.delete([path])
    except (OSError, BeamIOError):
        pass
    FileSystems.rename([tmp], [path])


def read_json(path: str) -> Any:
    with FileSystems.open(path) as f:
        return json.loads(f.read())


def dump_json(doc: Any) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def matching(pattern: str) -> list[str]:
    return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    # no statistics timestamps exist in parquet; created_by is the pyarrow version, fixed per env
    pq.write_table(table, buf, compression="zstd", row_group_size=10_000)
    return buf.getvalue()


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = TAR_MTIME
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


#: a member header's fields after the name and before the size, and from the mtime to the end
#: (mode 0644, uid/gid 0, regular file, no link, ustar magic, empty owner names, no device,
#: no prefix), as ``tarfile`` writes them in USTAR format
_HEAD_MID = b"0000644\x00" + b"0000000\x00" * 2
_HEAD_TAIL = (b"%011o\x00" % TAR_MTIME + b" " * 8 + tarfile.REGTYPE + b"\x00" * 100
              + tarfile.POSIX_MAGIC + b"\x00" * 64 + b"\x00" * 16 + b"\x00" * 155)


def _tar_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header ``tarfile`` writes for a member of :func:`_tar_info`, byte
    for byte, made without its per-field machinery (the sink writes three members a
    sample); a name that is not short ASCII goes through ``tarfile``."""
    if not name.isascii() or len(name) >= 100 or size >= 8**11:
        return _tar_info(name, size).tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    raw = name.encode("ascii")
    head = (raw + b"\x00" * (100 - len(raw)) + _HEAD_MID + b"%011o\x00" % size + _HEAD_TAIL
            + b"\x00" * 12)
    # the checksum: the byte sum with its own field as spaces, as 6 octal digits, NUL, space
    return head[:148] + b"%06o\x00" % sum(head) + head[155:]


class _TarWriter:
    """A USTAR stream of regular files, written as ``tarfile.open(mode="w|",
    format=USTAR_FORMAT)`` with :func:`_tar_info` members writes it, byte for byte."""

    def __init__(self, fileobj: Any) -> None:
        self.f = fileobj
        self.offset = 0

    def add(self, name: str, data: bytes) -> None:
        pad = -len(data) % tarfile.BLOCKSIZE
        self.f.write(_tar_header(name, len(data)) + data + b"\x00" * pad)
        self.offset += tarfile.BLOCKSIZE + len(data) + pad

    def close(self) -> None:
        # two zero blocks, then zeros up to a whole record, as TarFile.close writes them
        end = self.offset + 2 * tarfile.BLOCKSIZE
        self.f.write(b"\x00" * (2 * tarfile.BLOCKSIZE + (-end % tarfile.RECORDSIZE)))


def sample_json(row: dict[str, Any]) -> bytes:
    """The ``{key}.json`` member: the index row, with tags (and each of ``other_tags``) as an
    object."""
    doc = dict(row)
    if isinstance(doc.get("tags"), list):  # pyarrow map → list of pairs
        doc["tags"] = dict(doc["tags"])
    if isinstance(doc.get("other_tags"), list):
        doc["other_tags"] = [dict(t) if isinstance(t, list) else t for t in doc["other_tags"]]
    return json.dumps(doc, sort_keys=True, ensure_ascii=False).encode()


def shard_rows(rows: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], pa.Table]:
    """``rows`` sorted by key and their index table; a repeated key or a key with a dot
    fails."""
    rows = sorted(rows, key=lambda r: r["key"])
    for a, b in itertools.pairwise(rows):
        if a["key"] == b["key"]:
            raise AccountingError(
                f"key {a['key']} is kept twice ({a.get('source')}/{a.get('source_id')} and "
                f"{b.get('source')}/{b.get('source_id')}): a source gave two records one key")
    for r in rows:
        if "." in r["key"]:
            raise ValueError(f"key {r['key']!r} has a dot; webdataset would split it")
    return rows, schemas.to_table([public(r) for r in rows], schemas.SAMPLE_SCHEMA)


def write_tar(fileobj: Any, rows: list[dict[str, Any]], table: pa.Table,
              image: Callable[[dict[str, Any]], bytes] = lambda r: r["_image"]) -> None:
    """The shard tar of ``rows`` (as :func:`shard_rows` returns them) into ``fileobj``, as a
    stream: ``{key}.jpg`` (``image(row)``), ``{key}.txt``, ``{key}.json`` per row."""
    tar = _TarWriter(fileobj)
    for r, row in zip(rows, table.to_pylist(), strict=True):
        key = r["key"]
        tar.add(f"{key}.jpg", image(r))
        tar.add(f"{key}.txt", r["caption"].encode())
        tar.add(f"{key}.json", sample_json(row))
    tar.close()


# ----------------------------------------------------------------------------- spill

#: the working field of a spilled row: (spill file, offset, length) of its ``_image`` bytes
SPILL_REF = "_image_spill"
SPILL_FOLDER = "_spill"


def spills(output: str) -> bool:
    """Whether a build into ``output`` spills pictures (a local folder; see the docstring)."""
    return "://" not in output


def spill_dir(output: str, subset: str) -> str:
    return join(output, SPILL_FOLDER, subset)


class _Spill(beam.DoFn):
    """Rows with ``_image`` → the same rows with :data:`SPILL_REF` instead; one spill file a
    bundle (a retried bundle writes a new one; the dead attempt's is never referenced)."""

    def __init__(self, folder: str):
        self.folder = folder
        self._file: Any = None

    def start_bundle(self) -> None:
        self._close()  # a bundle that failed left its file open (its rows were discarded)

    def process(self, row: dict[str, Any]):
        if self._file is None:  # a local folder (see spills()): plain file calls
            os.makedirs(self.folder, exist_ok=True)
            self._path = os.path.join(self.folder, f"{uuid.uuid4().hex}.bin")
            self._file = open(self._path, "wb")  # noqa: SIM115 — open for the whole bundle
            self._offset = 0
        data = row["_image"]
        self._file.write(data)
        out = {k: v for k, v in row.items() if k != "_image"}
        out[SPILL_REF] = (self._path, self._offset, len(data))
        self._offset += len(data)
        yield out

    def finish_bundle(self) -> None:
        # rows leave the bundle when it commits, after this: every reference is readable
        self._close()

    def teardown(self) -> None:
        self._close()

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class _SpillReader:
    """``_image`` bytes of rows, spilled or not, in any order (each spill file opened once)."""

    def __init__(self) -> None:
        self._files: dict[str, Any] = {}

    def __call__(self, row: dict[str, Any]) -> bytes:
        ref = row.get(SPILL_REF)
        if ref is None:
            return row["_image"]
        path, offset, length = ref
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = open(path, "rb")  # noqa: SIM115 — closed by close()
        f.seek(offset)
        data = f.read(length)
        if len(data) != length:
            raise AccountingError(f"spill file {path} ends before {offset}+{length}: "
                                  "it was removed or truncated while the build ran")
        return data

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def remove_spill(output: str, subset: str) -> None:
    """The subset's spill folder, once its shards are written (or before a rebuild)."""
    if spills(output):
        shutil.rmtree(spill_dir(output, subset), ignore_errors=True)
        try:  # the last subset out removes the folder (another may still be spilling)
            os.rmdir(join(output, SPILL_FOLDER))
        except OSError:
            pass


def num_files(count: int, per_file: int) -> int:
    return max(1, math.ceil(count / per_file))


def shard_name(subset: str, index: int) -> str:
    return f"{subset}-{index:05d}"


def subset_files(output: str, subset: str) -> list[str]:
    """Every file of ``subset`` in the build folder ``output`` (for clearing a rebuild)."""
    found = []
    for folder in SUBSET_FOLDERS:
        found += matching(join(output, folder, f"{subset}-*"))
    found += matching(join(output, "subsets", subset, "*"))
    return found


# ----------------------------------------------------------------------------- writers


def _partition(pcoll, label: str, per_file: int):
    """``(groups, ranks)``: (bucket, rows) groups, rows spread by stable hash of key over
    ceil(n/per_file) buckets, and {bucket: file number} numbering the non-empty buckets
    0, 1, 2, ... in bucket order (so file numbers have no gaps)."""
    count = pcoll | f"{label}Count" >> beam.combiners.Count.Globally()
    groups = (
        pcoll
        | f"{label}Assign"
        >> beam.Map(
            lambda r, n: (stable_hash(r["key"]) % num_files(n, per_file), r),
            n=beam.pvalue.AsSingleton(count),
        )
        | f"{label}Group" >> beam.GroupByKey()
    )
    ranks = (
        groups
        | f"{label}Buckets" >> beam.Map(lambda kv: kv[0])
        | f"{label}BucketList" >> beam.combiners.ToList()
        | f"{label}Ranks" >> beam.Map(lambda b: {x: i for i, x in enumerate(sorted(b))})
    )
    return groups, ranks


class _WriteShard(beam.DoFn):
    def __init__(self, output: str, subset: str, embeddings_dir: str | None = None):
        self.output = output
        self.subset = subset
        self.embeddings_dir = embeddings_dir

    def process(self, item: tuple[int, Iterable[dict]], ranks: dict[int, int]):
        bucket, rows = item
        index = ranks[bucket]
        name = shard_name(self.subset, index)
        rows, table = shard_rows(dict(r, shard=f"{name}.tar") for r in rows)
        reader = _SpillReader()
        try:
            size = write_atomic_stream(join(self.output, "shards", f"{name}.tar"),
                                       lambda f: write_tar(f, rows, table, reader))
        finally:
            reader.close()
        write_atomic(join(self.output, "index", f"{name}.parquet"), parquet_bytes(table))
        embedded = 0
        if self.embeddings_dir:
            from pipelines.sinks.embeddings import part_files

            folder = join(self.embeddings_dir, self.subset)
            for rel, data in part_files(rows, self.subset, index).items():
                write_atomic(join(folder, *rel.split("/")), data)
            embedded = len(rows)
        beam.metrics.Metrics.counter("sink", "samples").inc(len(rows))
        log.info("wrote shard %s (%d samples, %.1f MB)", name, len(rows), size / 1e6)
        yield f"{name}.tar", len(rows), embedded


class WriteShards(beam.PTransform):
    """Kept records of one subset → ``shards/{subset}-NNNNN.tar`` + ``index/...parquet``
    (+ the part of the embeddings folder with the same rows, when ``embeddings_dir`` is set).

    Output: (shard file name, samples, embedding rows) per shard written.
    """

    def __init__(self, output: str, subset: str, samples_per_shard: int = 10_000,
                 embeddings_dir: str | None = None):
        super().__init__()
        self.output = output
        self.subset = subset
        self.samples_per_shard = samples_per_shard
        self.embeddings_dir = embeddings_dir

    def expand(self, records):
        if spills(self.output):
            records = records | "Spill" >> beam.ParDo(
                _Spill(spill_dir(self.output, self.subset)))
        groups, ranks = _partition(records, "Shard", self.samples_per_shard)
        return groups | "Write" >> beam.ParDo(
            _WriteShard(self.output, self.subset, self.embeddings_dir),
            ranks=beam.pvalue.AsSingleton(ranks))


class _WriteTable(beam.DoFn):
    def __init__(self, output: str, folder: str, subset: str, schema: pa.Schema):
        self.output = output
        self.folder = folder
        self.subset = subset
        self.schema = schema

    def process(self, item: tuple[int, Iterable[dict]], ranks: dict[int, int]):
        bucket, rows = item
        rows = sorted(rows, key=lambda r: (r["key"], r.get("stage") or "",
                                           r.get("reason") or r.get("method") or ""))
        table = schemas.to_table(rows, self.schema)
        name = f"{shard_name(self.subset, ranks[bucket])}.parquet"
        write_atomic(join(self.output, self.folder, name), parquet_bytes(table))
        yield name, len(rows)


class WriteTable(beam.PTransform):
    """Reject or duplicate rows → ``{folder}/{subset}-NNNNN.parquet`` sorted by key."""

    def __init__(self, output: str, folder: str, subset: str, schema: pa.Schema,
                 rows_per_file: int = 500_000):
        super().__init__()
        self.output = output
        self.folder = folder
        self.subset = subset
        self.schema = schema
        self.rows_per_file = rows_per_file

    def expand(self, rows):
        groups, ranks = _partition(rows, "Part", self.rows_per_file)
        return groups | "Write" >> beam.ParDo(
            _WriteTable(self.output, self.folder, self.subset, self.schema),
            ranks=beam.pvalue.AsSingleton(ranks))


# ----------------------------------------------------------------------------- stats


def _check_stats(doc: dict[str, Any]) -> None:
    """Validate ``doc`` against the contract (raises on a wrong type or a missing field)."""
    pa.Table.from_pylist(
        [dict(doc, input_by_source=list(doc["input_by_source"].items()))],
        schema=schemas.STATS_SCHEMA,
    )


def build_stats(
    *,
    recipe: str,
    subset: str,
    input_by_source: dict[str, int],
    kept: dict[str, int],
    rejected: dict[tuple[str, str, str], int],
    duplicates: dict[tuple[str, str, str], int],
    shards: int,
) -> dict[str, Any]:
    """One subset's ``stats.json`` (schemas.STATS_SCHEMA); raises AccountingError if the
    invariant ``input == kept + rejected + duplicates`` does not hold, overall or per source."""
    counts = (
        [
            {"subset": subset, "source": s, "stage": "sink", "outcome": "kept", "reason": None,
             "count": n}
            for s, n in kept.items()
        ]
        + [
            {"subset": subset, "source": s, "stage": st, "outcome": "rejected", "reason": r,
             "count": n}
            for (s, st, r), n in rejected.items()
        ]
        + [
            {"subset": subset, "source": s, "stage": st, "outcome": "duplicate", "reason": m,
             "count": n}
            for (s, st, m), n in duplicates.items()
        ]
    )
    counts.sort(key=lambda c: (c["source"], c["outcome"], c["stage"], c["reason"] or ""))
    totals = {
        "input": sum(input_by_source.values()),
        "kept": sum(kept.values()),
        "rejected": sum(rejected.values()),
        "duplicates": sum(duplicates.values()),
        "shards": shards,
    }
    doc = {
        "schema_version": schemas.SCHEMA_VERSION,
        "recipe": recipe,
        "subset": subset,
        "subsets": [subset],
        **totals,
        "input_by_source": dict(sorted(input_by_source.items())),
        "by_subset": [{"subset": subset, "recipe": recipe, **totals}],
        "counts": counts,
    }
    _check_stats(doc)
    problems = []
    for source in sorted(set(input_by_source) | {c["source"] for c in counts}):
        out = sum(c["count"] for c in counts if c["source"] == source)
        if out != input_by_source.get(source, 0):
            problems.append(f"{source}: input {input_by_source.get(source, 0)} != outputs {out}")
    if doc["input"] != doc["kept"] + doc["rejected"] + doc["duplicates"] or problems:
        raise AccountingError(
            f"accounting invariant broken in subset {subset}: input {doc['input']} != kept "
            f"{doc['kept']} + rejected {doc['rejected']} + duplicates {doc['duplicates']}; "
            + "; ".join(problems)
        )
    return doc


def merge_stats(recipe: str, docs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The top-level ``stats.json`` from per-subset ones; the invariant is checked again,
    overall and per subset."""
    docs = sorted(docs, key=lambda d: d["subset"])
    by_source: dict[str, int] = {}
    for d in docs:
        schemas.check_doc_version(d, f"subsets/{d['subset']}/stats.json")
        for s, n in d["input_by_source"].items():
            by_source[s] = by_source.get(s, 0) + n
    totals = {k: sum(d[k] for d in docs) for k in ("input", "kept", "rejected", "duplicates",
                                                    "shards")}
    doc = {
        "schema_version": schemas.SCHEMA_VERSION,
        "recipe": recipe,
        "subset": None,
        "subsets": [d["subset"] for d in docs],
        **totals,
        "input_by_source": dict(sorted(by_source.items())),
        "by_subset": [row for d in docs for row in d["by_subset"]],
        "counts": [c for d in docs for c in d["counts"]],
    }
    _check_stats(doc)
    bad = [d["subset"] for d in docs
           if d["input"] != d["kept"] + d["rejected"] + d["duplicates"]]
    if bad or doc["input"] != doc["kept"] + doc["rejected"] + doc["duplicates"]:
        raise AccountingError(f"accounting invariant broken in the merged stats: {bad}")
    return doc


class _Tally(beam.CombineFn):
    """``(kind, item)`` pairs → ``{kind: ...}``: for the kinds of :data:`COUNTS`, how often
    each item came; for :data:`LISTS`, the items. One combine instead of one per kind: a
    Beam transform costs construction and a runner stage costs start-up, per build."""

    COUNTS = ("inputs", "kept", "rejected", "dups")
    LISTS = ("shards", "files")

    def create_accumulator(self) -> dict[str, Any]:
        return {**{k: {} for k in self.COUNTS}, **{k: [] for k in self.LISTS}}

    def add_input(self, acc: dict[str, Any], kv: tuple[str, Any]) -> dict[str, Any]:
        kind, item = kv
        if kind in self.LISTS:
            acc[kind].append(item)
        else:
            acc[kind][item] = acc[kind].get(item, 0) + 1
        return acc

    def merge_accumulators(self, accs: Iterable[dict[str, Any]]) -> dict[str, Any]:
        accs = iter(accs)
        out = next(accs)
        for acc in accs:
            for kind in self.COUNTS:
                for item, n in acc[kind].items():
                    out[kind][item] = out[kind].get(item, 0) + n
            for kind in self.LISTS:
                out[kind].extend(acc[kind])
        return out

    def extract_output(self, acc: dict[str, Any]) -> dict[str, Any]:
        return acc


class WriteSubset(beam.PTransform):
    """One subset's records → its shards, index, rejects, duplicates (and embeddings parts),
    then ``subsets/{subset}/`` stats, sizes and manifest once the accounting holds.

    Input: a dict ``{"inputs", "kept", "rejects", "duplicates"}`` of this subset's records.
    Output: a PCollection of one element, the subset's stats document.
    """

    def __init__(self, output: str, recipe: str, subset: str, manifest: dict[str, Any],
                 samples_per_shard: int = 10_000, embeddings_dir: str | None = None):
        super().__init__()
        self.output = output
        self.recipe = recipe
        self.subset = subset
        self.manifest = manifest
        self.samples_per_shard = samples_per_shard
        self.embeddings_dir = embeddings_dir

    def expand(self, pcolls):
        kept = pcolls["kept"]
        shards = kept | "Shards" >> WriteShards(self.output, self.subset, self.samples_per_shard,
                                                self.embeddings_dir)
        rej_files = pcolls["rejects"] | "Rejects" >> WriteTable(
            self.output, "rejects", self.subset, schemas.REJECT_SCHEMA
        )
        dup_files = pcolls["duplicates"] | "Duplicates" >> WriteTable(
            self.output, "duplicates", self.subset, schemas.DUPLICATE_SCHEMA
        )

        def tag(kind: str, item: Callable[[Any], Any]) -> Callable[[Any], tuple[str, Any]]:
            return lambda x: (kind, item(x))

        tagged = [
            pcolls["inputs"] | "InputsKey" >> beam.Map(tag("inputs", lambda r: r["source"])),
            kept | "KeptKey" >> beam.Map(tag("kept", lambda r: r["source"])),
            pcolls["rejects"] | "RejectedKey" >> beam.Map(
                tag("rejected", lambda r: (r["source"], r["stage"], r["reason"]))),
            pcolls["duplicates"] | "DupsKey" >> beam.Map(
                tag("dups", lambda r: (r["source"], r["stage"], r["method"]))),
            shards | "ShardKey" >> beam.Map(tag("shards", tuple)),
            rej_files | "RejFileKey" >> beam.Map(tag("files", tuple)),
            dup_files | "DupFileKey" >> beam.Map(tag("files", tuple)),
        ]
        return (
            tagged
            | "AllCounts" >> beam.Flatten()
            | "Tally" >> beam.CombineGlobally(_Tally())
            | "Finish" >> beam.Map(self._finish)
        )

    def _finish(self, tally: dict[str, Any]):
        shards, files = tally["shards"], tally["files"]
        stats = build_stats(
            recipe=self.recipe,
            subset=self.subset,
            input_by_source=tally["inputs"],
            kept=tally["kept"],
            rejected=tally["rejected"],
            duplicates=tally["dups"],
            shards=len(shards),
        )
        sizes = {name: n for name, n, _ in sorted(shards)}
        if sum(sizes.values()) != stats["kept"]:
            # what the shard writers wrote, against what reached the sink: a runner that
            # drops elements inside a GroupByKey would otherwise pass the count check
            raise AccountingError(
                f"{self.subset}: shards hold {sum(sizes.values())} samples but "
                f"{stats['kept']} were kept"
            )
        extra = {}
        if self.embeddings_dir:
            rows = sum(e for _, _, e in shards)
            if rows != stats["kept"]:
                raise AccountingError(
                    f"{self.subset}: the embeddings folder holds {rows} rows but "
                    f"{stats['kept']} were kept")
            extra["embedding_parts"] = len(shards)
        # a worker that died between writing a temporary and renaming it left the temporary
        # (its bundle was retried under another name): the subset is complete, remove it
        stale = [f for f in subset_files(self.output, self.subset) if ".incomplete-" in f]
        if stale:
            FileSystems.delete(stale)
        remove_spill(self.output, self.subset)
        folder = join(self.output, "subsets", self.subset)
        manifest = dict(self.manifest, subset=self.subset, shards=sorted(sizes),
                        tables=sorted(n for n, _ in files), **extra)
        write_atomic(join(folder, "sizes.json"), dump_json(sizes))
        write_atomic(join(folder, "manifest.json"), dump_json(manifest))
        # stats.json last: its presence means this subset completed and its accounting held
        write_atomic(join(folder, "stats.json"), dump_json(stats))
        return stats


def merge_documents(output: str, recipe: str, manifest: dict[str, Any],
                    fresh: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """Write the top-level ``sizes.json`` (and ``shards/sizes.json``, where open_clip looks),
    ``manifest.json`` and, last, ``stats.json`` merged from every ``subsets/*/`` folder of
    ``output``; ``fresh``: stats documents of this build's subsets (checked against disk)."""
    subsets = sorted({p.rstrip("/").split("/")[-2]
                      for p in matching(join(output, "subsets", "*", "stats.json"))})
    docs, sizes, manifests = [], {}, {}
    for s in subsets:
        folder = join(output, "subsets", s)
        docs.append(read_json(join(folder, "stats.json")))
        sizes.update(read_json(join(folder, "sizes.json")))
        manifests[s] = read_json(join(folder, "manifest.json"))
    missing = sorted({d["subset"] for d in fresh} - set(subsets))
    if missing:
        raise AccountingError(f"subsets {missing} finished but their stats.json is not in "
                              f"{output}/subsets")
    stats = merge_stats(recipe, docs)
    if sum(sizes.values()) != stats["kept"]:
        raise AccountingError(f"shards hold {sum(sizes.values())} samples but the subsets "
                              f"kept {stats['kept']}")
    sizes = dict(sorted(sizes.items()))
    merged = dict(manifest, subsets=manifests, shards=sorted(sizes),
                  tables=sorted(t for m in manifests.values() for t in m.get("tables", [])))
    merged.pop("subset", None)
    write_atomic(join(output, "shards", "sizes.json"), dump_json(sizes))
    write_atomic(join(output, "sizes.json"), dump_json(sizes))
    write_atomic(join(output, "manifest.json"), dump_json(merged))
    # stats.json last: its presence means the build completed and its accounting held
    write_atomic(join(output, "stats.json"), dump_json(stats))
    return stats


class WriteBuild(beam.PTransform):
    """Writes everything of a build and checks the accounting before declaring success.

    Input: a dict ``{"inputs": records as read, "kept": ..., "rejects": ..., "duplicates":
    ...}`` holding rows of the ``subsets`` named (a row of any other subset fails the build).
    Each subset is written by :class:`WriteSubset`; then the top-level documents are merged
    from every subset in ``output`` (:func:`merge_documents`). Output: the merged stats.
    """

    def __init__(self, output: str, recipe: str, subsets: Sequence[str] | str,
                 manifest: dict[str, Any], samples_per_shard: int = 10_000,
                 embeddings_dir: str | None = None):
        super().__init__()
        self.output = output
        self.recipe = recipe
        self.subsets = [subsets] if isinstance(subsets, str) else list(subsets)
        if not self.subsets or len(set(self.subsets)) != len(self.subsets):
            raise ValueError(f"subsets must be distinct and not empty: {self.subsets}")
        self.manifest = manifest
        self.samples_per_shard = samples_per_shard
        self.embeddings_dir = embeddings_dir

    def _which(self, row: dict[str, Any], _n: int) -> int:
        try:
            return self.subsets.index(row["subset"])
        except ValueError:
            raise AccountingError(
                f"a row of subset {row.get('subset')!r} reached a sink that writes only "
                f"{self.subsets} (key {row.get('key')})") from None

    def expand(self, pcolls):
        n = len(self.subsets)
        parts = {name: pcolls[name] | f"BySubset[{name}]" >> beam.Partition(self._which, n)
                 for name in ("inputs", "kept", "rejects", "duplicates")}
        docs = []
        for i, subset in enumerate(self.subsets):
            docs.append(
                {name: parts[name][i] for name in parts}
                | f"Subset[{subset}]" >> WriteSubset(
                    self.output, self.recipe, subset, self.manifest, self.samples_per_shard,
                    self.embeddings_dir)
            )
        fresh = docs | "SubsetDocs" >> beam.Flatten() | "AllSubsets" >> beam.combiners.ToList()
        return (
            pcolls["inputs"].pipeline
            | "MergeOnce" >> beam.Create([None])
            | "Merge" >> beam.Map(
                lambda _, done: merge_documents(self.output, self.recipe, self.manifest, done),
                done=beam.pvalue.AsSingleton(fresh))
        )


def clear_previous(output: str, subsets: Sequence[str], embeddings_dir: str | None = None
                   ) -> list[str]:
    """Remove the files of an earlier build of these subsets, and the merged documents (the
    build writes them anew), so no file survives as stale: a killed rebuild leaves a folder
    without ``stats.json``, which the trainer refuses. Other subsets' files stay."""
    found = []
    for s in subsets:
        found += subset_files(output, s)
        remove_spill(output, s)
        if embeddings_dir:
            from pipelines.sinks.embeddings import subset_parts

            found += subset_parts(embeddings_dir, s)
    for name in DOCUMENTS:
        found += matching(join(output, name))
    found += matching(join(output, "shards", "sizes.json"))
    if found:
        FileSystems.delete(found)
    return found
