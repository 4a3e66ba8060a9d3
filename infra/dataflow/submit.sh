#!/usr/bin/env bash
# Submit a recipe's build to Dataflow from this checkout. Extra arguments pass through (recipe
# flags, Beam options, --dry_run=True to translate without submitting).
#
#   PROJECT=p REGION=us-central1 BUCKET=b IMAGE=REGION-docker.pkg.dev/p/rs/rs-corpus:TAG \
#   INPUT='gs://b/laion/*.parquet' infra/dataflow/submit.sh --dry_run=True
#
# RECIPE: rs5m (INPUT: a gs:// glob of LAION-style parquet), local (INPUT: a captioned folder),
# remoteclip (INPUT: name=format:root, comma-separated). Weights are gs:// paths: the workers
# copy them to local disk through Beam's FileSystems (pipelines.models.open_clip_loader).
# ACCELERATOR (e.g. 'type:nvidia-l4;count:1;install-nvidia-driver') puts GPUs on the model
# stages only (Dataflow right fitting); use the GPU image (make image-gpu) as IMAGE then.
set -euo pipefail
: "${PROJECT:?set PROJECT}" "${REGION:?set REGION}" "${BUCKET:?set BUCKET}"
: "${IMAGE:?set IMAGE (the worker image: make image / make image-gpu)}"
: "${INPUT:?set INPUT (see the header of this script)}"
RECIPE="${RECIPE:-rs5m}"
OUTPUT="${OUTPUT:-gs://$BUCKET/$RECIPE}"
MODELS="${MODELS:-gs://$BUCKET/models}"
cd "$(dirname "$0")/../.."
PY="${PY:-.venv/bin/python}"

args=(
  --runner=DataflowRunner --project="$PROJECT" --region="$REGION"
  --job_name="${JOB_NAME:-rs-corpus-$RECIPE-$(date -u +%Y%m%d-%H%M%S)}"
  --temp_location="gs://$BUCKET/tmp" --staging_location="gs://$BUCKET/staging"
  --sdk_container_image="$IMAGE" --sdk_location=container
  # fetch-bound stages: many requests in flight per worker, one SDK process per vCPU
  --machine_type="${MACHINE_TYPE:-n2-standard-4}"
  --max_num_workers="${MAX_WORKERS:-100}" --autoscaling_algorithm=THROUGHPUT_BASED
  --number_of_worker_harness_threads="${HARNESS_THREADS:-12}"
  --thread_count="${THREAD_COUNT:-64}"
  --output="$OUTPUT"
)
case "$RECIPE" in
  rs5m)
    args+=(--input="$INPUT"
           --rs_model="${RS_MODEL:-ViT-B-32}"
           --rs_pretrained="${RS_PRETRAINED:-$MODELS/vit-b-32.pt}"
           --rs_probe="${RS_PROBE:-$MODELS/rs_probe.json}") ;;
  local)
    args+=(--local="$INPUT" --clip_model="${CLIP_MODEL:-ViT-B-32}"
           --clip_pretrained="${CLIP_PRETRAINED:-$MODELS/vit-b-32.pt}") ;;
  remoteclip)
    args+=(--annotations="$INPUT" --clip_model="${CLIP_MODEL:-ViT-B-32}"
           --clip_pretrained="${CLIP_PRETRAINED:-$MODELS/vit-b-32.pt}") ;;
  *) echo "submit.sh: RECIPE must be rs5m, local or remoteclip, not $RECIPE" >&2; exit 2 ;;
esac
if [[ -n "${ACCELERATOR:-}" ]]; then
  args+=(--accelerator="$ACCELERATOR")
fi
exec "$PY" -m "pipelines.recipes.$RECIPE" "${args[@]}" "$@"
