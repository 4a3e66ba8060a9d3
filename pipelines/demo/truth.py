"""The demo world's ground-truth tables: one writer and one tally for every part of the world."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def write_truth(truth: Sequence[dict[str, Any]], schema: pa.Schema, path: str
                ) -> list[dict[str, Any]]:
    """Write ``truth`` projected on ``schema`` to ``path`` (parquet); the rows written."""
    rows = [{c: t.get(c) for c in schema.names} for t in truth]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, compression="snappy")
    return rows


def tally(rows: Sequence[dict[str, Any]], col: str) -> dict[str, int]:
    """How many rows hold each non-null value of ``col``, sorted by value."""
    out: dict[str, int] = {}
    for r in rows:
        if r[col] is not None:
            out[r[col]] = out.get(r[col], 0) + 1
    return dict(sorted(out.items()))


def fresh_part(out_dir: str, folder: str, truth_file: str) -> tuple[str, str]:
    """Clear a part of the world (``out_dir/folder`` and its truth file) before it is
    written again; ``(folder path, truth path)``."""
    root = os.path.join(out_dir, folder)
    shutil.rmtree(root, ignore_errors=True)
    truth_path = os.path.join(out_dir, truth_file)
    if os.path.exists(truth_path):
        os.remove(truth_path)
    os.makedirs(root)
    return root, truth_path
