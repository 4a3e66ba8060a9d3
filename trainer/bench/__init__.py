"""``make bench``: score CLIP checkpoints on the evaluations of RS5M, RemoteCLIP and SkyScript.

Pieces, one file each:

* :mod:`trainer.bench.registry` — known datasets, class-name normalisation, prompt sets;
* :mod:`trainer.bench.datasets` — loaders for the four formats (class-per-folder, Karpathy
  captions, RemoteCount, AIR-SLT);
* :mod:`trainer.bench.protocols` — the metrics as pure functions of embeddings;
* :mod:`trainer.bench.report` — ``results.json``, ``results.md`` (published figures beside
  ours), ``fewshot.png``;
* :mod:`trainer.bench.models` — loading models (``BenchModel``), embedding with an on-disk
  cache (``OUTPUT/cache/<model-key>/<dataset>.npz``, plain arrays, read with
  ``allow_pickle=False``);
* :mod:`trainer.bench.evaluate` — running the protocols (``evaluate``);
* :mod:`trainer.bench.__main__` — the command line.

The dataset formats are read by :mod:`pipelines.sources.benchmarks` (decontamination reads
the same files) and models are loaded by :mod:`pipelines.models.open_clip_loader` (the
pipelines' one loader).

Real weights (GeoRSCLIP, RemoteCLIP, SkyCLIP) go through the same path as ours::

    python -m trainer.bench --model ViT-B-32 --pretrained /models/RemoteCLIP-ViT-B-32.pt \\
        --name RemoteCLIP-ViT-B-32 --datasets AID,RESISC45,RSICD --data-root /data/rs
"""

