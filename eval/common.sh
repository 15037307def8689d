# Shared by the eval/*.sh suites (sourced, not run): the model options and the launcher.
#   CHECKPOINT  a vlp run directory, checkpoints/step_N directory or model.safetensors  (or set MODEL)
#   MODEL       instead of CHECKPOINT: e.g. open_clip:ViT-B-32, with PRETRAINED=/path/to/weights.safetensors
#   NPROC       processes for torchrun (default 1: plain `python -m vlp`); ranks split the images
#   BATCH_SIZE WORKERS PRECISION DEVICE   passed through (defaults 256, 2, fp32, auto)
set -euo pipefail
PYTHON=${PYTHON:-python}
NPROC=${NPROC:-1}
model_args=()
if [[ -n "${CHECKPOINT:-}" ]]; then
    model_args+=(--checkpoint "$CHECKPOINT")
elif [[ -n "${MODEL:-}" ]]; then
    model_args+=(--model "$MODEL")
    if [[ -n "${PRETRAINED:-}" ]]; then model_args+=(--pretrained "$PRETRAINED"); fi
else
    echo "set CHECKPOINT=runs/NAME (or MODEL=open_clip:ARCH PRETRAINED=FILE)" >&2
    exit 2
fi
model_args+=(--batch-size "${BATCH_SIZE:-256}" --workers "${WORKERS:-2}" --precision "${PRECISION:-fp32}"
             --device "${DEVICE:-auto}")

vlp_eval() {
    if [[ "$NPROC" -gt 1 ]]; then
        "$PYTHON" -m torch.distributed.run --nproc_per_node="$NPROC" -m vlp eval "$@"
    else
        "$PYTHON" -m vlp eval "$@"
    fi
}
