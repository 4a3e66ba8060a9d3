# rs-corpus: build RS image-text corpora with Apache Beam, train and benchmark RS CLIP on them.
# Every target creates the virtualenv on first use; `make help` lists them.

PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

RUNNER ?= DirectRunner
OUTPUT ?= out/rs5m
DEMO   ?= data/demo
DEMO_PORT ?= 8707
# sizes of the demo world, e.g. DEMO_ARGS='--n-remoteclip 400' (python -m pipelines.demo build --help)
DEMO_ARGS ?=
# INPUT: build-rs5m: a glob of LAION-style parquet files; build-local: a captioned folder;
# build-remoteclip: comma-separated name=format:root datasets;
# empty = the bundled demo world (served on loopback)
INPUT  ?=
ARGS   ?=

# make train / make bench
DATA       ?= out/rs5m
NPROC      ?= 1
CHECKPOINT ?= out/train/checkpoints/latest.pt

.PHONY: help venv demo build-rs5m build-local build-remoteclip build-skyscript remotecount stats report train bench lint test perf perf-ingest perf-dedup perf-train perf-caption perf-skyscript image image-gpu dataflow-template plan clean

help:
	@echo "make build-rs5m RUNNER=DirectRunner [INPUT=glob] [OUTPUT=dir] [ARGS='...']"
	@echo "make build-local INPUT=folder [OUTPUT=out/local] [ARGS='...']   your captioned images"
	@echo "make build-remoteclip [INPUT=name=format:root,...] [OUTPUT=out/remoteclip] [ARGS='...']"
	@echo "make build-skyscript [OSM=glob IMAGERY=glob|listing] [OUTPUT=out/skyscript] [ARGS='...']"
	@echo "make remotecount [ANNOTATIONS=name=format:root,...] [OUTPUT=out/remotecount]   counting benchmark"
	@echo "make stats OUTPUT=dir      per-source stage table of a build (DuckDB)"
	@echo "make report OUTPUT=dir     HTML report of a build: funnel, samples, duplicates, rejects, captions, map, datasheet"
	@echo "make train [DATA=out/rs5m] [OUTPUT=out/train] [NPROC=1] [ARGS='...']"
	@echo "make bench [CHECKPOINT=out/train/checkpoints/latest.pt] [OUTPUT=out/bench] [ARGS='...']"
	@echo "make test                  the test suite"
	@echo "make perf-ingest           fetch+resize+shard throughput vs img2dataset"
	@echo "make perf-caption          captioning images/s vs one-image-per-generate fp32"
	@echo "make perf-skyscript        OSM objects/s, tiles/s and the time split (demo place)"
	@echo "make plan [RECIPE=rs5m] [N=5000000] [ARGS='--workers W --cpu-price P --gpu-price P']"
	@echo "make image / make image-gpu   worker images (CPU / CUDA) on Beam's Python SDK image"
	@echo "make dataflow-template IMAGE=... TEMPLATE=gs://...   Dataflow flex template"
	@echo "make demo                  (re)generate the demo world and tiny models in $(DEMO)"

venv: $(STAMP)

# the worker images' pins (infra/docker/constraints.txt) hold here too: the launcher, the tests
# and the workers run the same versions, and a new release on the index changes none of them
# until infra/docker/pin.py is rerun
$(STAMP): pyproject.toml infra/docker/constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned inside the machine's cap, so no resolver picks a newer CUDA build
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -q -e ".[dev]" -c infra/docker/constraints.txt
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m pipelines.demo build --out $(DEMO) --port $(DEMO_PORT) $(DEMO_ARGS)

build-rs5m: $(STAMP)
ifeq ($(strip $(INPUT)),)
	$(PY) -m pipelines.demo build --out $(DEMO) --port $(DEMO_PORT) $(DEMO_ARGS) --if-missing
	$(PY) -m pipelines.demo run --out $(DEMO) --port $(DEMO_PORT) --recipe rs5m -- \
	  --runner $(RUNNER) --output $(OUTPUT) $(ARGS)
else
	$(PY) -m pipelines.recipes.rs5m --runner $(RUNNER) --input '$(INPUT)' --output $(OUTPUT) $(ARGS)
endif

build-local: OUTPUT = out/local
build-local: $(STAMP)
ifeq ($(strip $(INPUT)),)
	$(PY) -m pipelines.demo build --out $(DEMO) --port $(DEMO_PORT) $(DEMO_ARGS) --if-missing
	$(PY) -m pipelines.demo run --out $(DEMO) --port $(DEMO_PORT) --recipe local -- \
	  --runner $(RUNNER) --output $(OUTPUT) $(ARGS)
else
	$(PY) -m pipelines.recipes.local --runner $(RUNNER) --local '$(INPUT)' --output $(OUTPUT) $(ARGS)
endif

build-remoteclip: OUTPUT = out/remoteclip
build-remoteclip: $(STAMP)
ifeq ($(strip $(INPUT)),)
	$(PY) -m pipelines.demo build --out $(DEMO) --port $(DEMO_PORT) $(DEMO_ARGS) --if-missing
	$(PY) -m pipelines.demo run --out $(DEMO) --port $(DEMO_PORT) --recipe remoteclip -- \
	  --runner $(RUNNER) --output $(OUTPUT) $(ARGS)
else
	$(PY) -m pipelines.recipes.remoteclip --runner $(RUNNER) --annotations '$(INPUT)' \
	  --output $(OUTPUT) $(ARGS)
endif

# SkyScript: OSM extracts x georeferenced imagery (default: the demo world's)
OSM     ?=
IMAGERY ?=
build-skyscript: OUTPUT = out/skyscript
build-skyscript: $(STAMP)
ifeq ($(strip $(OSM)),)
	$(PY) -m pipelines.demo build --out $(DEMO) --port $(DEMO_PORT) $(DEMO_ARGS) --if-missing
	$(PY) -m pipelines.demo run --out $(DEMO) --port $(DEMO_PORT) --recipe skyscript -- \
	  --runner $(RUNNER) --output $(OUTPUT) $(ARGS)
else
	@test -n "$(IMAGERY)" || { echo "build-skyscript: OSM needs IMAGERY=glob|listing"; exit 2; }
	$(PY) -m pipelines.recipes.skyscript --runner $(RUNNER) --osm '$(OSM)' \
	  --imagery '$(IMAGERY)' --output $(OUTPUT) $(ARGS)
endif

# the counting benchmark from held-out detection annotations (default: the demo world's)
ANNOTATIONS ?=
remotecount: OUTPUT = out/remotecount
remotecount: $(STAMP)
ifeq ($(strip $(ANNOTATIONS)),)
	$(PY) -m pipelines.demo build --out $(DEMO) --port $(DEMO_PORT) $(DEMO_ARGS) --if-missing
	$(PY) -m pipelines.remotecount --annotations "$$(cat $(DEMO)/remoteclip/heldout.txt)" \
	  --out $(OUTPUT) $(ARGS)
else
	$(PY) -m pipelines.remotecount --annotations '$(ANNOTATIONS)' --out $(OUTPUT) $(ARGS)
endif

train: OUTPUT = out/train
# the tiny model the demo world $(DEMO) holds: make train's default, make bench's baseline
TINY_CLIP = $(DEMO)/models/tiny-clip
TRAIN_MODEL = $(if $(findstring --model,$(ARGS)),,--model $(TINY_CLIP))
train: $(STAMP)
	@$(PY) -m trainer.data $(DATA)
	@test -z "$(TRAIN_MODEL)" -o -f $(TINY_CLIP)/open_clip_config.json || { echo "train: no tiny model in $(TINY_CLIP): run make build-rs5m$(if $(filter data/demo,$(DEMO)),, DEMO=$(DEMO)) first (it builds the demo world and its model), or pass ARGS='--model DIR_OR_ARCH'"; exit 1; }
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m trainer.train \
	  --data $(DATA) --output $(OUTPUT) $(TRAIN_MODEL) $(ARGS)

bench: OUTPUT = out/bench
bench: $(STAMP)
ifeq ($(findstring --datasets,$(ARGS)),)
	$(PY) -m pipelines.demo bench-sets --out $(DEMO)
endif
	$(PY) -m trainer.bench --checkpoint $(CHECKPOINT) --output $(OUTPUT) \
	  --demo-dir $(DEMO)/bench --baseline-model $(TINY_CLIP) $(ARGS)

stats: $(STAMP)
	$(PY) -m pipelines.stats $(OUTPUT)

report: $(STAMP)
	@test -f $(OUTPUT)/stats.json || { echo "$(OUTPUT) has no stats.json: run make build-rs5m OUTPUT=$(OUTPUT) (or build-local/build-remoteclip/build-skyscript) first"; exit 1; }
	$(PY) -m pipelines.report $(OUTPUT) $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q $(ARGS)

perf: perf-ingest perf-dedup perf-train perf-caption perf-skyscript

perf-ingest: $(STAMP)
	$(PY) -m pipelines.perf.ingest $(ARGS)

perf-dedup: $(STAMP)
	$(PY) -m pipelines.perf.dedup $(ARGS)

perf-train: $(STAMP)
	$(PY) -m trainer.perf $(ARGS)

perf-caption: $(STAMP)
	$(PY) -m pipelines.demo.tiny_blip2 --out $(DEMO)/models/tiny-blip2
	$(PY) -m pipelines.perf.caption --model $(DEMO)/models/tiny-blip2 $(ARGS)

# OSM read, catalogue, assign and cut rates on the demo world's SkyScript place
perf-skyscript: $(STAMP)
	$(PY) -m pipelines.demo build --out $(DEMO) --port $(DEMO_PORT) $(DEMO_ARGS) --if-missing
	$(PY) -m pipelines.perf.skyscript --osm '$(DEMO)/skyscript/osm/*' \
	  --imagery '$(DEMO)/skyscript/imagery/*/*.tif' $(ARGS)

# cluster runs (infra/README.md): worker images, the Dataflow flex template, the cost plan
IMAGE     ?= rs-corpus:latest
IMAGE_GPU ?= rs-corpus-gpu:latest
TEMPLATE  ?=
RECIPE    ?= rs5m
N         ?= 5000000
image:
	docker build -f infra/docker/Dockerfile -t $(IMAGE) .

image-gpu:
	docker build -f infra/docker/Dockerfile.gpu -t $(IMAGE_GPU) .

dataflow-template:
	IMAGE=$(IMAGE) TEMPLATE=$(TEMPLATE) infra/dataflow/build_template.sh

plan: $(STAMP)
	$(PY) -m pipelines.plan --recipe $(RECIPE) --n $(N) $(ARGS)

clean:
	rm -rf out data
