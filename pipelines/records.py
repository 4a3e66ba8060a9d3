"""What flows between stages: plain dicts keyed by the schema's column names, plus ``Reject``.

A stage is a pure function that takes a record and returns either the (updated) record or a
``Reject``; its Beam wrapper routes rejects to the ``rejects`` tagged output. Working fields
that never reach a shard (fetched bytes, the encoded image) start with an underscore and are
dropped by the sink.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

#: The stage output contract, the same for every stage: records that go on under ``MAIN``,
#: reject rows under ``REJECTS``, duplicate rows under ``DUPLICATES`` (tagged outputs).
MAIN = "records"
REJECTS = "rejects"
DUPLICATES = "duplicates"


def make_key(source: str, source_id: str, variant: str = "") -> str:
    """Stable 20-hex-char key of (source, source_id, variant); never contains a dot."""
    h = hashlib.sha256(f"{source}\x1f{source_id}\x1f{variant}".encode()).hexdigest()
    return h[:20]


def new_record(subset: str, source: str, source_id: str, url: str | None = None,
               **fields: Any) -> dict[str, Any]:
    """An input record: its provenance (``key`` from source and source_id, ``subset``,
    ``source``, ``source_id``, ``url``), then ``fields`` in the order given."""
    return {"key": make_key(source, source_id), "subset": subset, "source": source,
            "source_id": source_id, "url": url, **fields}


def stable_hash(text: str) -> int:
    """A 64-bit hash that is the same in every process and on every runner (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


@dataclasses.dataclass(frozen=True)
class Reject:
    stage: str
    reason: str
    detail: str | None = None
    score: float | None = None


def provenance(record: dict[str, Any]) -> dict[str, Any]:
    """The columns every output row carries to say where the record came from."""
    return {k: record.get(k) for k in ("key", "subset", "source", "source_id", "url")}


def reject_row(record: dict[str, Any], rej: Reject) -> dict[str, Any]:
    """The ``rejects/`` row for ``record`` rejected by ``rej`` (see schemas.REJECT_SCHEMA)."""
    return {
        **provenance(record),
        "caption": record.get("caption"),
        "stage": rej.stage,
        "reason": rej.reason,
        "detail": rej.detail,
        "score": rej.score,
    }


def duplicate_row(
    record: dict[str, Any], *, stage: str, duplicate_of: str, method: str, similarity: float
) -> dict[str, Any]:
    """The ``duplicates/`` row for ``record`` (see schemas.DUPLICATE_SCHEMA)."""
    return {
        **provenance(record),
        "stage": stage,
        "duplicate_of": duplicate_of,
        "method": method,
        "similarity": float(similarity),
    }


def public(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` without its working fields (those starting with ``_``)."""
    return {k: v for k, v in record.items() if not k.startswith("_")}
