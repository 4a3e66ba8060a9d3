"""The one sink every recipe ends in: webdataset shards, their parquet index, rejects,
duplicates, and the build's stats/sizes/manifest documents.

Determinism: a sample's shard is ``stable_hash(key) % num_shards`` where ``num_shards`` is
derived from the kept count, keys are sorted inside a shard, and tar members carry a fixed
mtime, uid/gid 0 and empty owner names, so the same input and config give byte-identical
shards and index files on any runner. Each file is written under a temporary name and renamed,
so no reader ever sees half a shard.
"""

from __future__ import annotations

import io
import json
import logging
import math
import posixpath
import tarfile
import uuid
from collections.abc import Iterable
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

import schemas
from pipelines.records import public, stable_hash

log = logging.getLogger(__name__)

#: 2000-01-01T00:00:00Z: a fixed, plausible mtime for every tar member
TAR_MTIME = 946684800


def join(*parts: str) -> str:
    return FileSystems.join(*parts) if "://" in parts[0] else posixpath.join(*parts)


def write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary name + rename (any Beam filesystem)."""
    tmp = f"{path}.incomplete-{uuid.uuid4().hex[:8]}"
    with FileSystems.create(tmp) as f:
        f.write(data)
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([tmp], [path])


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    # no statistics timestamps exist in parquet; created_by is the pyarrow version, fixed per env
    pq.write_table(table, buf, compression="zstd", row_group_size=10_000)
    return buf.getvalue()


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = TAR_MTIME
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def sample_json(row: dict[str, Any]) -> bytes:
    """The ``{key}.json`` member: the index row, with tags as an object."""
    doc = dict(row)
    if isinstance(doc.get("tags"), list):  # pyarrow map → list of pairs
        doc["tags"] = dict(doc["tags"])
    return json.dumps(doc, sort_keys=True, ensure_ascii=False).encode()


def shard_bytes(rows: list[dict[str, Any]]) -> tuple[bytes, pa.Table]:
    """Tar and index table for ``rows`` (each with ``_image`` JPEG bytes), sorted by key."""
    rows = sorted(rows, key=lambda r: r["key"])
    table = schemas.to_table([public(r) for r in rows], schemas.SAMPLE_SCHEMA)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for r, row in zip(rows, table.to_pylist(), strict=True):
            key = r["key"]
            if "." in key:
                raise ValueError(f"key {key!r} has a dot; webdataset would split it")
            _tar_member(tar, f"{key}.jpg", r["_image"])
            _tar_member(tar, f"{key}.txt", r["caption"].encode())
            _tar_member(tar, f"{key}.json", sample_json(row))
    return buf.getvalue(), table


def num_files(count: int, per_file: int) -> int:
    return max(1, math.ceil(count / per_file))


def shard_name(subset: str, index: int) -> str:
    return f"{subset}-{index:05d}"


class _WriteShard(beam.DoFn):
    def __init__(self, output: str, subset: str):
        self.output = output
        self.subset = subset

    def process(self, item: tuple[int, Iterable[dict]]):
        index, rows = item
        name = shard_name(self.subset, index)
        rows = [dict(r, shard=f"{name}.tar") for r in rows]
        tar, table = shard_bytes(rows)
        write_atomic(join(self.output, "shards", f"{name}.tar"), tar)
        write_atomic(join(self.output, "index", f"{name}.parquet"), parquet_bytes(table))
        beam.metrics.Metrics.counter("sink", "samples").inc(len(rows))
        log.info("wrote shard %s (%d samples, %.1f MB)", name, len(rows), len(tar) / 1e6)
        yield f"{name}.tar", len(rows)


class _WriteTable(beam.DoFn):
    def __init__(self, output: str, folder: str, subset: str, schema: pa.Schema):
        self.output = output
        self.folder = folder
        self.subset = subset
        self.schema = schema

    def process(self, item: tuple[int, Iterable[dict]]):
        index, rows = item
        rows = sorted(rows, key=lambda r: (r["key"], r.get("stage") or ""))
        table = schemas.to_table(rows, self.schema)
        name = f"{shard_name(self.subset, index)}.parquet"
        write_atomic(join(self.output, self.folder, name), parquet_bytes(table))
        yield name, len(rows)


def _partition(pcoll, label: str, per_file: int):
    """(file index, rows) groups: rows spread by stable hash of key over ceil(n/per_file)."""
    count = pcoll | f"{label}Count" >> beam.combiners.Count.Globally()
    return (
        pcoll
        | f"{label}Assign"
        >> beam.Map(
            lambda r, n: (stable_hash(r["key"]) % num_files(n, per_file), r),
            n=beam.pvalue.AsSingleton(count),
        )
        | f"{label}Group" >> beam.GroupByKey()
    )


class WriteShards(beam.PTransform):
    """Kept records → ``shards/{subset}-NNNNN.tar`` + ``index/{subset}-NNNNN.parquet``.

    Output: (shard file name, sample count) per shard written.
    """

    def __init__(self, output: str, subset: str, samples_per_shard: int = 10_000):
        super().__init__()
        self.output = output
        self.subset = subset
        self.samples_per_shard = samples_per_shard

    def expand(self, records):
        return _partition(records, "Shard", self.samples_per_shard) | "Write" >> beam.ParDo(
            _WriteShard(self.output, self.subset)
        )


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
        return _partition(rows, "Part", self.rows_per_file) | "Write" >> beam.ParDo(
            _WriteTable(self.output, self.folder, self.subset, self.schema)
        )


# ------------------------------------------------------------------------- stats


class AccountingError(RuntimeError):
    """input != kept + rejected + duplicates: some record vanished or was counted twice."""


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
    """The ``stats.json`` document (schemas.STATS_SCHEMA); raises AccountingError if the
    invariant ``input == kept + rejected + duplicates`` does not hold, overall or per source."""
    counts = (
        [
            {"source": s, "stage": "sink", "outcome": "kept", "reason": None, "count": n}
            for s, n in kept.items()
        ]
        + [
            {"source": s, "stage": st, "outcome": "rejected", "reason": r, "count": n}
            for (s, st, r), n in rejected.items()
        ]
        + [
            {"source": s, "stage": st, "outcome": "duplicate", "reason": m, "count": n}
            for (s, st, m), n in duplicates.items()
        ]
    )
    counts.sort(key=lambda c: (c["source"], c["outcome"], c["stage"], c["reason"] or ""))
    doc = {
        "schema_version": schemas.SCHEMA_VERSION,
        "recipe": recipe,
        "subset": subset,
        "input": sum(input_by_source.values()),
        "kept": sum(kept.values()),
        "rejected": sum(rejected.values()),
        "duplicates": sum(duplicates.values()),
        "shards": shards,
        "input_by_source": dict(sorted(input_by_source.items())),
        "counts": counts,
    }
    # validate against the contract (raises on a wrong type or a missing field)
    pa.Table.from_pylist(
        [dict(doc, input_by_source=list(doc["input_by_source"].items()))],
        schema=schemas.STATS_SCHEMA,
    )
    problems = []
    for source in sorted(set(input_by_source) | {c["source"] for c in counts}):
        out = sum(c["count"] for c in counts if c["source"] == source)
        if out != input_by_source.get(source, 0):
            problems.append(f"{source}: input {input_by_source.get(source, 0)} != outputs {out}")
    if doc["input"] != doc["kept"] + doc["rejected"] + doc["duplicates"] or problems:
        raise AccountingError(
            f"accounting invariant broken: input {doc['input']} != kept {doc['kept']} + "
            f"rejected {doc['rejected']} + duplicates {doc['duplicates']}; " + "; ".join(problems)
        )
    return doc


def _count_by(pcoll, label: str, key_fn):
    return (
        pcoll
        | f"{label}Key" >> beam.Map(key_fn)
        | f"{label}Count" >> beam.combiners.Count.PerElement()
        | f"{label}List" >> beam.combiners.ToList()
    )


class WriteBuild(beam.PTransform):
    """Writes everything of a build and checks the accounting before declaring success.

    Input: a dict ``{"inputs": records as read, "kept": ..., "rejects": ..., "duplicates":
    ...}`` and, when an embeddings folder is written, ``"embeddings"``: the (part, rows) that
    ``WriteEmbeddings`` outputs. Writes shards, index, rejects, duplicates, then
    ``stats.json``, ``sizes.json`` (top level and beside the shards, where open_clip looks)
    and ``manifest.json``. These come after every other file, the embeddings parts included,
    and only when the embeddings hold exactly the kept rows.
    """

    def __init__(self, output: str, recipe: str, subset: str, manifest: dict[str, Any],
                 samples_per_shard: int = 10_000):
        super().__init__()
        self.output = output
        self.recipe = recipe
        self.subset = subset
        self.manifest = manifest
        self.samples_per_shard = samples_per_shard

    def expand(self, pcolls):
        kept = pcolls["kept"]
        shards = kept | "Shards" >> WriteShards(self.output, self.subset, self.samples_per_shard)
        rej_files = pcolls["rejects"] | "Rejects" >> WriteTable(
            self.output, "rejects", self.subset, schemas.REJECT_SCHEMA
        )
        dup_files = pcolls["duplicates"] | "Duplicates" >> WriteTable(
            self.output, "duplicates", self.subset, schemas.DUPLICATE_SCHEMA
        )
        side = {
            "inputs": _count_by(pcolls["inputs"], "Inputs", lambda r: r["source"]),
            "kept": _count_by(kept, "Kept", lambda r: r["source"]),
            "rejected": _count_by(
                pcolls["rejects"], "Rejected", lambda r: (r["source"], r["stage"], r["reason"])
            ),
            "dups": _count_by(
                pcolls["duplicates"], "Dups", lambda r: (r["source"], r["stage"], r["method"])
            ),
            "shards": shards | "ShardList" >> beam.combiners.ToList(),
            "files": (
                (rej_files, dup_files)
                | "AllFiles" >> beam.Flatten()
                | "FileList" >> beam.combiners.ToList()
            ),
        }
        if pcolls.get("embeddings") is not None:
            side["embeddings"] = pcolls["embeddings"] | "EmbParts" >> beam.combiners.ToList()
        return (
            pcolls["inputs"].pipeline
            | "Once" >> beam.Create([None])
            | "Finish"
            >> beam.Map(
                self._finish, **{k: beam.pvalue.AsSingleton(v) for k, v in side.items()}
            )
        )

    def _finish(self, _, inputs, kept, rejected, dups, shards, files, embeddings=None):
        stats = build_stats(
            recipe=self.recipe,
            subset=self.subset,
            input_by_source=dict(inputs),
            kept=dict(kept),
            rejected=dict(rejected),
            duplicates=dict(dups),
            shards=len(shards),
        )
        sizes = dict(sorted(shards))
        if sum(sizes.values()) != stats["kept"]:
            # what the shard writers wrote, against what reached the sink: a runner that
            # drops elements inside a GroupByKey would otherwise pass the count check
            raise AccountingError(
                f"shards hold {sum(sizes.values())} samples but {stats['kept']} were kept"
            )
        extra = {}
        if embeddings is not None:
            rows = sum(n for _, n in embeddings)
            if rows != stats["kept"]:
                raise AccountingError(
                    f"the embeddings folder holds {rows} rows but {stats['kept']} were kept")
            extra["embedding_parts"] = len(embeddings)
        dump = lambda d: (json.dumps(d, indent=2, sort_keys=True) + "\n").encode()  # noqa: E731
        write_atomic(join(self.output, "shards", "sizes.json"), dump(sizes))
        write_atomic(join(self.output, "sizes.json"), dump(sizes))
        manifest = dict(self.manifest, shards=sorted(sizes), tables=sorted(n for n, _ in files),
                        **extra)
        write_atomic(join(self.output, "manifest.json"), dump(manifest))
        # stats.json last: its presence means the build completed and its accounting held
        write_atomic(join(self.output, "stats.json"), dump(stats))
        return stats
