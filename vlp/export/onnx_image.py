"""The image half of an ONNX export's ``preprocessing.json``: a model's eval preprocessing as ordered, named steps.

A client outside Python rebuilds the ``pixels`` input of ``image_encoder.onnx`` by running the steps in order on
the decoded image. Each step is a dict with an ``op`` name, its parameters and a ``text`` that states the exact rule
(sizes, rounding, filter passes). The ops:

- ``decode``: the file as 8-bit RGB with the model's alpha policy (no EXIF rotation is applied);
- ``resize_shorter_side``, ``resize``, ``resize_keep_ratio``: antialiased resampling with ``filter`` (Pillow's
  ``BICUBIC`` / ``BILINEAR`` kernels), in the ``passes`` the reference computes them;
- ``center_crop`` / ``center_crop_or_pad``;
- ``to_float`` (x / 255), ``normalize`` ((x - mean) / std per channel), ``to_chw`` (HWC -> CHW, then a batch axis).

The reference is the model's evaluation transform (:class:`~vlp.data.preprocess.Preprocess`): for a vlp record
(``source: vlp``) and an ``open_clip:`` model's record (``source: open_clip``) alike, open_clip's eval transform of
the record, whose resampling is Pillow's own ``Image.resize`` (one call), which a Pillow client reproduces exactly.
"""

from __future__ import annotations

from vlp.data.preprocess import Preprocess

_ALPHA_RULES = {
    "white": ("decode the file (no EXIF rotation); palette images with a transparent colour become RGBA; RGBA, LA "
              "and PA images are composited over opaque white (Pillow: Image.alpha_composite onto a white RGBA "
              "image); then convert to 8-bit RGB (Pillow: convert('RGB'))"),
    "convert": ("decode the file (no EXIF rotation) and convert to 8-bit RGB as Pillow's convert('RGB') does "
                "(transparency is dropped, not composited)"),
}
_PILLOW = ("pillow", "one Pillow call, img.resize((new_w, new_h), filter); skipped when the size is unchanged")
_ROUND = "round_half_even"


def _filter(preprocess: Preprocess, interpolation: str) -> tuple[dict, str]:
    """(the resampling fields of a resize step, the sentence that says how its passes are computed)."""
    passes, passes_text = _PILLOW
    return {"filter": interpolation, "antialias": True, "passes": passes}, passes_text


def _resize_steps(preprocess: Preprocess) -> list[dict]:
    """The geometry steps of ``preprocess`` (resize, then crop or pad) for a (H, W) output."""
    height, width = preprocess.height_width
    square = height == width
    filter_step, passes_text = _filter(preprocess, preprocess.interpolation)
    crop = {"op": "center_crop", "size": [height, width],
            "text": f"crop [top, top + {height}) x [left, left + {width}) with top = {_ROUND}((h - {height}) / 2) "
                    f"and left = {_ROUND}((w - {width}) / 2) for the current h x w"}
    if preprocess.resize == "squash":
        return [{"op": "resize", "size": [height, width], **filter_step,
                 "text": f"resize to {height} x {width} (aspect ratio not kept); {passes_text}"}]
    if preprocess.resize == "shortest" and square:
        size = height
        return [{"op": "resize_shorter_side", "size": size, **filter_step,
                 "text": f"resize so the shorter side is {size} and the longer side floor({size} * longer / "
                         f"shorter); {passes_text}"}, crop]
    if preprocess.source != "open_clip":
        raise ValueError(f"preprocess: no description of a vlp record with resize={preprocess.resize!r} at "
                         f"{height} x {width}")
    fit = "longest" if preprocess.resize == "longest" else "shortest"
    if fit == "shortest":  # open_clip's ResizeKeepRatio for a non-square 'shortest' is built without its interpolation
        filter_step, passes_text = _filter(preprocess, "bicubic")
    pick = "max" if fit == "longest" else "min"
    resize = {"op": "resize_keep_ratio", "fit": fit, "size": [height, width], **filter_step,
              "text": f"ratio = {pick}(h / {height}, w / {width}); resize to {_ROUND}(h / ratio) x {_ROUND}(w / "
                      f"ratio); {passes_text}"}
    if fit == "shortest":
        return [resize, crop]
    pad = {"op": "center_crop_or_pad", "size": [height, width], "fill": preprocess.fill_color,
           "text": f"where a side is shorter than the target, pad it with the value {preprocess.fill_color} on all "
                   f"channels: (target - side) // 2 before and the rest after; then center_crop as above"}
    return [resize, pad]


def image_preprocessing(preprocess: Preprocess) -> dict:
    """The JSON description of ``preprocess`` (a model's eval preprocessing) for ``preprocessing.json``."""
    height, width = preprocess.height_width
    steps = [
        {"op": "decode", "colour": "RGB", "alpha": preprocess.alpha, "text": _ALPHA_RULES[preprocess.alpha]},
        *_resize_steps(preprocess),
        {"op": "to_float", "scale": 1 / 255, "text": "float32 pixel values divided by 255"},
        {"op": "normalize", "mean": list(preprocess.mean), "std": list(preprocess.std),
         "text": "per channel (R, G, B): (x - mean) / std"},
        {"op": "to_chw", "text": "HWC -> CHW; stack images on a leading batch axis: (batch, 3, H, W) float32"},
    ]
    return {
        "size": [height, width],
        "resize_mode": preprocess.resize,
        "interpolation": preprocess.interpolation,
        "alpha": preprocess.alpha,
        "colour": "RGB",
        "mean": list(preprocess.mean),
        "std": list(preprocess.std),
        "reference": preprocess.source,
        "steps": steps,
    }
