"""The record contracts: one Arrow schema per record that crosses a boundary.

Writers and readers import these; nothing else in the project defines a column. Every
parquet file we write carries ``SCHEMA_VERSION`` in its metadata (key ``rs_corpus.schema``)
so a reader can refuse a file written by an incompatible version.

Bump ``SCHEMA_VERSION`` whenever a column is removed, renamed or changes type; adding a
nullable column is backwards compatible and only bumps the minor part.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "1.0"
METADATA_KEY = b"rs_corpus.schema"

BOX = pa.struct(
    [
        ("label", pa.string()),
        ("x0", pa.float32()),
        ("y0", pa.float32()),
        ("x1", pa.float32()),
        ("y1", pa.float32()),
    ]
)

#: One kept sample: a row of ``index/*.parquet`` and the ``{key}.json`` member of a shard.
SAMPLE_FIELDS = [
    pa.field("key", pa.string(), nullable=False),
    pa.field("subset", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("source_id", pa.string(), nullable=False),
    pa.field("url", pa.string()),
    pa.field("license", pa.string()),
    pa.field("shard", pa.string()),
    # text
    pa.field("caption", pa.string(), nullable=False),
    pa.field("caption_kind", pa.string(), nullable=False),
    pa.field("captions", pa.list_(pa.string())),
    # image as written to the shard, and as it arrived
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("original_width", pa.int32()),
    pa.field("original_height", pa.int32()),
    pa.field("sha256", pa.string()),
    pa.field("phash", pa.string()),
    # what the model stages decided
    pa.field("rs_score", pa.float32()),
    pa.field("clip_score", pa.float32()),
    # geo; nullable where a source lacks it, never invented
    pa.field("lat", pa.float64()),
    pa.field("lon", pa.float64()),
    pa.field("bbox", pa.list_(pa.float64())),
    pa.field("crs", pa.string()),
    pa.field("gsd_m", pa.float32()),
    pa.field("acquired", pa.string()),
    pa.field("labels", pa.list_(pa.string())),
    pa.field("tags", pa.map_(pa.string(), pa.string())),
    pa.field("boxes", pa.list_(BOX)),
    # input columns we do not interpret, kept verbatim as a JSON object
    pa.field("extra", pa.string()),
]

#: One input record that did not make it: ``rejects/*.parquet``.
REJECT_FIELDS = [
    pa.field("key", pa.string(), nullable=False),
    pa.field("subset", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("source_id", pa.string(), nullable=False),
    pa.field("url", pa.string()),
    pa.field("caption", pa.string()),
    pa.field("stage", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("detail", pa.string()),
    # the number the decision was made on, where there is one (rs_score, clip_score, ...)
    pa.field("score", pa.float32()),
]

#: One input record dropped because another record carries the same content:
#: ``duplicates/*.parquet``.
DUPLICATE_FIELDS = [
    pa.field("key", pa.string(), nullable=False),
    pa.field("subset", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("source_id", pa.string(), nullable=False),
    pa.field("url", pa.string()),
    pa.field("stage", pa.string(), nullable=False),
    pa.field("duplicate_of", pa.string(), nullable=False),
    # url | sha256 | phash | phash_crop (a centre crop's pHash matched) | semantic
    pa.field("method", pa.string(), nullable=False),
    # 1.0 for exact methods; 1 - hamming/64 for phash; cosine for semantic
    pa.field("similarity", pa.float32()),
]

#: One row of an embeddings folder's ``metadata/metadata_N.parquet`` (clip-retrieval layout),
#: aligned with the rows of ``img_emb/img_emb_N.npy`` and ``text_emb/text_emb_N.npy``.
EMBEDDING_METADATA_FIELDS = [
    pa.field("key", pa.string(), nullable=False),
    pa.field("shard", pa.string()),
    pa.field("caption", pa.string()),
    pa.field("url", pa.string()),
    pa.field("source", pa.string()),
    pa.field("source_id", pa.string()),
    pa.field("clip_score", pa.float32()),
]

COUNT = pa.struct(
    [
        ("source", pa.string()),
        ("stage", pa.string()),
        # kept | rejected | duplicate
        ("outcome", pa.string()),
        ("reason", pa.string()),
        ("count", pa.int64()),
    ]
)

#: ``stats.json``: one document per build.
STATS_FIELDS = [
    pa.field("schema_version", pa.string(), nullable=False),
    pa.field("recipe", pa.string(), nullable=False),
    pa.field("subset", pa.string(), nullable=False),
    pa.field("input", pa.int64(), nullable=False),
    pa.field("kept", pa.int64(), nullable=False),
    pa.field("rejected", pa.int64(), nullable=False),
    pa.field("duplicates", pa.int64(), nullable=False),
    pa.field("shards", pa.int64(), nullable=False),
    pa.field("input_by_source", pa.map_(pa.string(), pa.int64())),
    pa.field("counts", pa.list_(COUNT)),
]


def _schema(fields: list[pa.Field], name: str) -> pa.Schema:
    return pa.schema(fields, metadata={METADATA_KEY: f"{name}/{SCHEMA_VERSION}".encode()})


SAMPLE_SCHEMA = _schema(SAMPLE_FIELDS, "sample")
REJECT_SCHEMA = _schema(REJECT_FIELDS, "reject")
DUPLICATE_SCHEMA = _schema(DUPLICATE_FIELDS, "duplicate")
STATS_SCHEMA = _schema(STATS_FIELDS, "stats")
EMBEDDING_METADATA_SCHEMA = _schema(EMBEDDING_METADATA_FIELDS, "embedding_metadata")

SAMPLE_COLUMNS = tuple(f.name for f in SAMPLE_FIELDS)
REJECT_COLUMNS = tuple(f.name for f in REJECT_FIELDS)
DUPLICATE_COLUMNS = tuple(f.name for f in DUPLICATE_FIELDS)


def conform(row: dict, schema: pa.Schema) -> dict:
    """Project ``row`` onto ``schema``'s columns (missing columns become None)."""
    return {name: row.get(name) for name in schema.names}


def to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Build a table of ``rows`` with exactly ``schema`` (raises on a type mismatch)."""
    return pa.Table.from_pylist([conform(r, schema) for r in rows], schema=schema)


def check_version(schema: pa.Schema, expected: pa.Schema) -> None:
    """Refuse a file whose schema version's major part differs from ours."""
    found = (schema.metadata or {}).get(METADATA_KEY)
    want = expected.metadata[METADATA_KEY]
    if found is None:
        raise ValueError(f"not an rs_corpus file: no {METADATA_KEY.decode()} metadata")
    if found.split(b"/")[0] != want.split(b"/")[0] or found.split(b"/")[1].split(b".")[0] != (
        want.split(b"/")[1].split(b".")[0]
    ):
        raise ValueError(f"schema {found.decode()} is incompatible with {want.decode()}")
