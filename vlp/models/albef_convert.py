"""A checkpoint of the original ALBEF code turned into a vlp model directory (``vlp convert albef``).

The output directory gets ``model.safetensors`` and ``config.yaml``: what ``vlp eval --checkpoint DIR`` reads, and
what a training run starts from with ``model.pretrained=DIR/model.safetensors`` (an ALBEF run then copies the
online weights into its momentum encoder, as ALBEF does at the start of pretraining). The checkpoint's own momentum
copies and queues are checked against the model but not written.
"""

from __future__ import annotations

from pathlib import Path

from vlp.config import Config, ConfigError, save_config
from vlp.io import atomic_path
from vlp.models.albef_import import AlbefImport, load_albef_checkpoint

MODEL_FILE, CONFIG_FILE = "model.safetensors", "config.yaml"


def convert_albef_checkpoint(checkpoint: str | Path, config: Config, out: str | Path, *,
                             strict: bool = True) -> AlbefImport:
    """Map the ALBEF checkpoint onto the model ``config.model`` builds (an ``albef-*`` preset) and write
    ``out/config.yaml`` and ``out/model.safetensors`` (under a temporary name, renamed into place); the import
    (missing and leftover keys, momentum weights, queue) is returned. Nothing is written when it fails; ``strict``:
    refuse a checkpoint that does not cover the model exactly."""
    import safetensors.torch

    from vlp.models.factory import create_model

    out = Path(out)
    if (out / MODEL_FILE).exists():
        raise ConfigError(f"--out {out}: already holds {MODEL_FILE}; choose a new directory")
    model = create_model(config.model)
    if not hasattr(model, "has_fusion"):
        raise ConfigError(f"model.name={config.model.name!r} is not an ALBEF preset (albef-*)")
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"ALBEF checkpoint {str(checkpoint)!r} does not exist")
    result = load_albef_checkpoint(checkpoint, model, strict=strict)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / CONFIG_FILE)
    with atomic_path(out / MODEL_FILE) as tmp:
        safetensors.torch.save_model(model, str(tmp))
    return result
