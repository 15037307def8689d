#!/usr/bin/env bash
# ImageNet-1k zero-shot (top-1, top-5, mean per-class recall), 1000 open_clip class names x 80 OpenAI templates.
#   IMAGENET_VAL  ImageFolder root: IMAGENET_VAL/n01440764/*.JPEG ... (1000 synset folders, 50 000 images)
#   OUT           result directory (default: results/imagenet_zeroshot)
#   plus CHECKPOINT / MODEL and the options of eval/common.sh
# Example: CHECKPOINT=runs/mine IMAGENET_VAL=/data/imagenet/val eval/imagenet_zeroshot.sh
source "$(dirname "$0")/common.sh"
: "${IMAGENET_VAL:?set IMAGENET_VAL to the ImageNet validation folder (one n######## folder per class)}"
vlp_eval zeroshot "${model_args[@]}" --data "$IMAGENET_VAL" --imagenet --dataset imagenet1k \
    --out "${OUT:-results/imagenet_zeroshot}"
