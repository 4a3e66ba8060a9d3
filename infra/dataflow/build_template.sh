#!/usr/bin/env bash
# Build and register the Dataflow flex template (make dataflow-template):
#   IMAGE=REGION-docker.pkg.dev/PROJECT/rs/rs-corpus:TAG   the worker image (pushed: make image)
#   TEMPLATE=gs://BUCKET/templates/rs-corpus.json          where the template spec goes
# The template image is IMAGE plus Dataflow's launcher (infra/dataflow/flex-template/), pushed
# as IMAGE-flex; the spec names it and the parameters of flex-template/metadata.json.
set -euo pipefail
: "${IMAGE:?set IMAGE (the pushed worker image)}" "${TEMPLATE:?set TEMPLATE (gs://.../x.json)}"
cd "$(dirname "$0")/../.."
FLEX_IMAGE="${FLEX_IMAGE:-$IMAGE-flex}"
docker build -f infra/dataflow/flex-template/Dockerfile --build-arg WORKER_IMAGE="$IMAGE" \
  -t "$FLEX_IMAGE" .
docker push "$FLEX_IMAGE"
gcloud dataflow flex-template build "$TEMPLATE" --image "$FLEX_IMAGE" --sdk-language PYTHON \
  --metadata-file infra/dataflow/flex-template/metadata.json
echo "template: $TEMPLATE (image $FLEX_IMAGE)"
