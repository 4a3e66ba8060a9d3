#!/usr/bin/env bash
# Submit the RS5M PUB11 build to Dataflow. Extra arguments pass through (e.g. --dry_run=True).
set -euo pipefail
: "${PROJECT:?set PROJECT}" "${REGION:?set REGION}" "${BUCKET:?set BUCKET}"
: "${IMAGE:?set IMAGE (the worker image from infra/dataflow/Dockerfile)}"
: "${INPUT:?set INPUT (a gs:// glob of LAION-style parquet)}"
cd "$(dirname "$0")/../.."
exec .venv/bin/python -m pipelines.recipes.rs5m \
  --runner=DataflowRunner --project="$PROJECT" --region="$REGION" \
  --temp_location="gs://$BUCKET/tmp" --staging_location="gs://$BUCKET/staging" \
  --sdk_container_image="$IMAGE" --experiments=use_runner_v2 \
  --input="$INPUT" --output="gs://$BUCKET/rs5m" \
  --rs_model="${RS_MODEL:-ViT-B-32}" --rs_pretrained="${RS_PRETRAINED:-gs://$BUCKET/models/vit-b-32.pt}" \
  --rs_probe="${RS_PROBE:-gs://$BUCKET/models/rs_probe.json}" \
  "$@"
