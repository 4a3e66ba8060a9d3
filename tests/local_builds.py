"""What the worker-pool, retry and Dataflow-graph tests share: the smallest demo world the
``local`` recipe builds, a build of it, a byte-for-byte comparison of two builds (manifests
aside, which name the runner and the output folder), and the split of a pipeline's transforms
by the ``--accelerator`` hint."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.demo.recipes import recipe_args
from pipelines.recipes import local


def make_world(root: Path, seed: int) -> Path:
    from pipelines.demo.local import build_local
    from pipelines.demo.pub11 import build_pub11
    from pipelines.demo.tiny_models import build_tiny_clip

    # the folder's scenes are drawn far from PUB11's: it needs a (small) PUB11 world first
    build_pub11(str(root), "http://127.0.0.1:9", seed=seed, n_rs=12, n_non_rs=0, n_probe=0)
    build_local(str(root), seed=seed, n=8)
    build_tiny_clip(str(root / "models" / "tiny-clip"), seed=seed)
    return root


def build(world: Path, out: Path, *extra: str) -> dict:
    return local.run([*recipe_args(str(world), "local"), "--output", str(out),
                      "--samples_per_shard", "4", *extra])


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def manifest_content(doc):
    """A manifest without what names the run rather than its content: the runner, the
    output folder and the fetch processes (``--fetch_processes auto`` resolves by runner;
    also in the subsets' manifests nested in the top-level one)."""
    if isinstance(doc, dict):
        return {k: manifest_content({c: x for c, x in v.items()
                                     if c not in ("output", "fetch_processes")}
                                    if k == "config" else v)
                for k, v in doc.items() if k != "runner"}
    if isinstance(doc, list):
        return [manifest_content(v) for v in doc]
    return doc


def assert_same_build(a: Path, b: Path) -> None:
    """Every file of ``a`` and ``b`` byte-identical, but the manifests, equal once what names
    the run is set aside."""
    fa, fb = files(a), files(b)
    assert sorted(fa) == sorted(fb)
    assert any(name.startswith("shards/") for name in fa)
    assert any(name.startswith("rejects/") for name in fa)
    for name in fa:
        if name.endswith("manifest.json"):
            assert manifest_content(json.loads(fa[name])) == \
                manifest_content(json.loads(fb[name])), name
        else:
            assert fa[name] == fb[name], name


def accelerator_split(proto, accelerator: str) -> tuple[set[str], set[str]]:
    """(hinted, plain): the unique names of ``proto``'s transforms that run in an environment
    with the accelerator resource hint (checked to equal ``accelerator``), and of the others."""
    from apache_beam.transforms.resources import AcceleratorHint

    envs = proto.components.environments
    hinted, plain = set(), set()
    for t in proto.components.transforms.values():
        if not t.environment_id:
            continue
        hints = envs[t.environment_id].resource_hints
        if AcceleratorHint.urn in hints:
            assert hints[AcceleratorHint.urn] == accelerator.encode()
            hinted.add(t.unique_name)
        else:
            plain.add(t.unique_name)
    return hinted, plain
