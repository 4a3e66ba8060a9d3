"""Exact and near-exact dedup across the whole corpus: by URL, by sha256, by pHash.

**URL dedup** (before fetching, so a URL is downloaded once): records with the same URL
(whitespace-trimmed; the scheme and host lower-cased) collapse onto the one with the smallest
key.

**Content dedup** (after decoding): two images are the same when their original bytes have
the same sha256, or their 64-bit perceptual hashes are within ``max_hamming`` bits. A plain
pHash moves ~14 bits when 5% is cropped off each side, so each image also carries the pHashes
of its centre crops (``images.CROP_SCALES``: 95%, 90%, 85%, 80% of the side), and the
distance of two images is the smallest Hamming distance between one's full hash and the
other's full or crop hashes (:func:`distance`): a copy cropped by 2.5-10% a side, centred,
lands within a few bits of a crop hash of its original. Crop hash against crop hash is not
compared: it catches no more variants and costs precision. Off-centre crops are not caught
(semantic dedup is the tool for those).

Candidate pairs are found without comparing all pairs: each hash is cut into
``max_hamming + 1`` bands, and two hashes within ``max_hamming`` bits agree exactly on at
least one band (pigeonhole), so grouping by (band index, band value) finds every pair. Pairs
become edges, edges become connected components (a global union-find over the edges only; at
RS5M scale that is ~1M edges, a few hundred MB), and each component keeps one survivor.

**Survivor rule** (deterministic, documented in the README): the member with the most
original pixels wins (the least downscaled or cropped copy), then the most original bytes
(the least recompressed copy), then the smallest key. When several subsets are built together
the subset's priority (``_subset_rank``, set by ``pipelines.recipes.kit``) comes first. Every other member becomes a
``duplicates/`` row pointing at the survivor, with ``method`` ``sha256`` when its bytes equal
the survivor's, ``phash`` when the full hashes are within ``max_hamming`` bits, ``phash_crop``
when only a crop hash is, and ``similarity`` = 1 - hamming/64 (1 for sha256).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

import apache_beam as beam

from pipelines.records import DUPLICATES, duplicate_row
from pipelines.stages.images import split_hashes

#: the pHash Hamming distance up to which two images are copies of one another: re-encodes and
#: resizes land at 0-2 bits, distinct demo scenes at 12+ and distinct web photos far more
DEFAULT_MAX_HAMMING = 4

#: a band group larger than this is compared only between neighbours in sorted order, so one
#: degenerate hash value (blank images) cannot make a worker compare millions of pairs
MAX_BUCKET = 2000
WINDOW = 64


def normalise_url(url: str) -> str:
    parts = urlsplit(url.strip())
    return urlunsplit(
        (parts.scheme.lower(), parts.netloc.lower(), parts.path, parts.query, parts.fragment)
    )


class Node(NamedTuple):
    """What dedup needs of a record; ordering by ``rank`` gives the survivor first."""

    rank: tuple[int, int, int, str]
    key: str
    sha256: str
    phash: int
    crops: tuple[int, ...] = ()  # pHashes of the centre crops (images.CROP_SCALES)


def node_of(record: dict[str, Any], crops: bool = True) -> Node:
    pixels = int(record.get("original_width") or 0) * int(record.get("original_height") or 0)
    nbytes = int(record.get("_original_bytes") or 0)
    # across subsets built together, the subset's priority comes first (recipes.kit)
    subset_rank = int(record.get("_subset_rank") or 0)
    return Node((subset_rank, -pixels, -nbytes, record["key"]), record["key"], record["sha256"],
                int(record["phash"], 16),
                tuple(split_hashes(record.get("_phash_crops"))) if crops else ())


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def distance(a_full: int, a_crops: Sequence[int], b_full: int, b_crops: Sequence[int]) -> int:
    """Smallest Hamming distance between one image's full pHash and the other's full or crop
    pHashes (crop against crop is not compared)."""
    best = hamming(a_full, b_full)
    for c in b_crops:
        best = min(best, hamming(a_full, c))
    for c in a_crops:
        best = min(best, hamming(b_full, c))
    return best


def node_distance(a: Node, b: Node) -> int:
    return distance(a.phash, a.crops, b.phash, b.crops)


def band_keys(phash: int, max_hamming: int) -> list[tuple[int, int]]:
    """(band index, band value) for ``max_hamming + 1`` contiguous bands of a 64-bit hash."""
    n = max_hamming + 1
    edges = [round(i * 64 / n) for i in range(n + 1)]
    return [
        (i, (phash >> edges[i]) & ((1 << (edges[i + 1] - edges[i])) - 1)) for i in range(n)
    ]


def bucket_edges(bucket: tuple, entries: list, max_hamming: int) -> Iterator[tuple[Node, Node]]:
    """Pairs of nodes in one bucket within ``max_hamming`` bits (:func:`node_distance`).

    A sha256 bucket holds nodes, identical bytes: a star from its best node connects it. A
    band bucket holds ``(node, via_full)``: whether the node's full hash (not only one of its
    crop hashes) has this band; two nodes that both came in through crop hashes alone need not
    be compared.
    """
    if bucket[0] == "sha":
        nodes = sorted(entries)
        yield from ((nodes[0], n) for n in nodes[1:])
        return
    full: dict[Node, bool] = {}
    for node, via_full in entries:
        full[node] = full.get(node, False) or via_full
    nodes = sorted(full)
    if len(nodes) <= MAX_BUCKET:
        pairs: Iterable[tuple[Node, Node]] = itertools.combinations(nodes, 2)
    else:
        nodes = sorted(nodes, key=lambda n: (n.phash, n.rank))
        pairs = (
            (a, b) for i, a in enumerate(nodes) for b in nodes[i + 1 : i + 1 + WINDOW]
        )
    for a, b in pairs:
        if not (full[a] or full[b]):
            continue
        if a.sha256 == b.sha256 or node_distance(a, b) <= max_hamming:
            yield a, b


def components(edges: Iterable[tuple[Node, Node]]) -> dict[str, tuple[Node, Node]]:
    """Union-find over ``edges``: key of every non-survivor → (its node, the survivor)."""
    parent: dict[Node, Node] = {}

    def find(x: Node) -> Node:
        parent.setdefault(x, x)
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            # the better-ranked root wins, so every root is its component's survivor
            if rb.rank < ra.rank:
                ra, rb = rb, ra
            parent[rb] = ra
    return {n.key: (n, find(n)) for n in list(parent) if find(n) != n}


def describe(node: Node, survivor: Node, max_hamming: int = DEFAULT_MAX_HAMMING
             ) -> tuple[str, float]:
    """(method, similarity) of ``node`` as a duplicate of ``survivor``.

    A component can chain (a ~ b ~ c), so a member need not be within ``max_hamming`` of its
    survivor; the reported similarity is still measured against the survivor."""
    if node.sha256 == survivor.sha256:
        return "sha256", 1.0
    full = hamming(node.phash, survivor.phash)
    d = node_distance(node, survivor)
    method = "phash_crop" if d < full and full > max_hamming else "phash"
    return method, 1.0 - d / 64.0


# ----------------------------------------------------------------------------- Beam


class DedupByUrl(beam.PTransform):
    """Records → one record per URL (main) and the rest (``duplicates``)."""

    def expand(self, records):
        def split(item):
            _, group = item
            group = sorted(group, key=lambda r: r["key"])
            yield group[0]
            for r in group[1:]:
                yield beam.pvalue.TaggedOutput(
                    DUPLICATES,
                    duplicate_row(r, stage="url_dedup", duplicate_of=group[0]["key"],
                                  method="url", similarity=1.0),
                )

        return (
            records
            | "ByUrl" >> beam.Map(lambda r: (normalise_url(r["url"]), r))
            | "Group" >> beam.GroupByKey()
            | "Survivor" >> beam.FlatMap(split).with_outputs(DUPLICATES, main="records")
        )


class EdgeList(beam.CombineFn):
    """Gathers every duplicate edge on one worker; subclasses turn them into decisions.

    Only edges travel (a small fraction of the corpus), so this global step stays small."""

    def create_accumulator(self):
        return []

    def add_input(self, acc, edge):
        acc.append(edge)
        return acc

    def merge_accumulators(self, accs):
        return [e for acc in accs for e in acc]


class _UnionFind(EdgeList):
    def __init__(self, max_hamming: int = DEFAULT_MAX_HAMMING) -> None:
        self.max_hamming = max_hamming

    def extract_output(self, acc):
        return {k: (describe(n, s, self.max_hamming), s.key)
                for k, (n, s) in components(acc).items()}


class DedupByContent(beam.PTransform):
    """Records with sha256/phash → unique records (main) and ``duplicates``."""

    def __init__(self, max_hamming: int = DEFAULT_MAX_HAMMING, enabled: bool = True,
                 crops: bool = True):
        super().__init__()
        self.max_hamming = max_hamming
        self.enabled = enabled
        self.crops = crops  # compare centre-crop pHashes too (catches cropped copies)

    def expand(self, records):
        if not self.enabled:
            dups = records.pipeline | "NoDuplicates" >> beam.Create([])
            return {"records": records, DUPLICATES: dups}
        t, crops = self.max_hamming, self.crops

        def bucket_keys(r):
            node = node_of(r, crops)
            yield ("sha", node.sha256), node
            seen = set()
            for band in band_keys(node.phash, t):
                seen.add(band)
                yield ("band", band), (node, True)
            for c in node.crops:
                for band in band_keys(c, t):
                    if band not in seen:
                        seen.add(band)
                        yield ("band", band), (node, False)

        decisions = (
            records
            | "Buckets" >> beam.FlatMap(bucket_keys)
            | "GroupBuckets" >> beam.GroupByKey()
            | "Edges" >> beam.FlatMap(lambda kv: bucket_edges(kv[0], list(kv[1]), t))
            | "Components" >> beam.CombineGlobally(_UnionFind(t))
        )

        def route(r, dup_map):
            hit = dup_map.get(r["key"])
            if hit is None:
                yield r
                return
            (method, similarity), survivor = hit
            yield beam.pvalue.TaggedOutput(
                DUPLICATES,
                duplicate_row(r, stage="dedup", duplicate_of=survivor, method=method,
                              similarity=similarity),
            )

        return records | "Route" >> beam.FlatMap(
            route, dup_map=beam.pvalue.AsSingleton(decisions)
        ).with_outputs(DUPLICATES, main="records")
