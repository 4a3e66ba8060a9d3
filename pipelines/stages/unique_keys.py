"""Unique keys: one record per key, the rows that repeat a key rejected as ``duplicate_id``.

A record's key derives from (source, source_id), so two input rows that carry the same id
column value get the same key. Web parquet has such rows (the same ``SAMPLE_ID`` on two rows
with different images). Kept both, the shard would hold two members of one name and
``webdataset`` refuses the tar ("duplicate file name in tar file"). This stage keeps the first
row in input order (the source's ``_order`` field: file, then row; ties broken by URL and
caption so the choice never depends on the runner) and rejects the others at stage ``read``
with reason ``duplicate_id``; the detail names the row that kept the key. Unlike a
``duplicates/`` row, the rejected row's content may well differ: it is an input error, not a
copy.

The shard writer refuses a repeated key too (``sinks/shards.py``), so a source that forgets
this stage fails loudly rather than writing a tar webdataset cannot read.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam

from pipelines.records import MAIN, REJECTS, Reject, reject_row

STAGE = "read"
REASON = "duplicate_id"


def _order(record: dict[str, Any]) -> tuple[str, str, str]:
    return (str(record.get("_order") or ""), str(record.get("url") or ""),
            str(record.get("caption") or ""))


def first_of_each_key(group: tuple[str, Iterable[dict[str, Any]]]) -> Iterator[Any]:
    """The first record of a key group (main output) and the others as ``duplicate_id`` rejects."""
    _, records = group
    records = sorted(records, key=_order)
    first, rest = records[0], records[1:]
    yield first
    file, _, row = str(first.get("_order") or "").partition("\x1f")
    where = f"row {int(row)} of {file}" if row.isdigit() else "an earlier row"
    for r in rest:
        rej = Reject(STAGE, REASON, f"source_id {r.get('source_id')!r} was already used by "
                                    f"{where}; ids must be unique per source")
        yield beam.pvalue.TaggedOutput(REJECTS, reject_row(r, rej))


class UniqueKeys(beam.PTransform):
    """Records → ``{"records": one per key, "rejects": the repeats (duplicate_id)}``."""

    def expand(self, records: beam.PCollection) -> Any:
        return (
            records
            | "ByKey" >> beam.Map(lambda r: (r["key"], r))
            | "GroupByKey" >> beam.GroupByKey()
            | "FirstPerKey" >> beam.FlatMap(first_of_each_key).with_outputs(REJECTS, main=MAIN)
        )
