#!/usr/bin/env bash
# COCO / Flickr30k retrieval on a Karpathy split: image<->text Recall@1/5/10, all 5 captions of an image positive.
#   KARPATHY_JSON  dataset_coco.json or dataset_flickr30k.json
#   IMAGES         image root; an image is IMAGES/<filepath>/<filename> (COCO: IMAGES/val2014/...) or
#                  IMAGES/<filename> (Flickr30k: the flickr30k-images folder)
#   SPLIT          default: test (the 5k COCO / 1k Flickr30k test images)
#   DATASET        name in the results (default: <json stem>_<split>)
#   OUT            result directory (default: results/retrieval_<json stem>_<split>)
#   plus CHECKPOINT / MODEL and the options of eval/common.sh
# Example: CHECKPOINT=runs/mine KARPATHY_JSON=/data/coco/dataset_coco.json IMAGES=/data/coco eval/retrieval_karpathy.sh
source "$(dirname "$0")/common.sh"
: "${KARPATHY_JSON:?set KARPATHY_JSON to dataset_coco.json or dataset_flickr30k.json}"
: "${IMAGES:?set IMAGES to the image root}"
SPLIT=${SPLIT:-test}
stem=$(basename "$KARPATHY_JSON" .json)
dataset_args=()
if [[ -n "${DATASET:-}" ]]; then dataset_args+=(--dataset "$DATASET"); fi
vlp_eval retrieval "${model_args[@]}" --karpathy-json "$KARPATHY_JSON" --images "$IMAGES" --split "$SPLIT" \
    "${dataset_args[@]}" --out "${OUT:-results/retrieval_${stem}_${SPLIT}}"
