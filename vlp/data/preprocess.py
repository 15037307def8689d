"""A model's image preprocessing as one record: decode (alpha policy, JPEG draft), geometry, interpolation, mean/std.

Preprocessing belongs to the model. Every path that turns image bytes into model input (the training and
evaluation loaders, ImageFolder and Karpathy sets, multi-caption shards, index builds, search queries, the demo
grid) asks the model's :class:`Preprocess` to decode and transform, so a model sees at evaluation exactly what it
was trained with, or what its reference tool gives it:

- a vlp model: ``model.preprocess`` of its saved config (run directories written before the section existed load
  with its defaults: alpha composited onto white, CLIP mean/std, bicubic, short side + centre crop);
- an ``open_clip:`` model given as ``--model``: open_clip's own preprocessing config of that model (the
  ``preprocess_cfg`` open_clip attaches to ``model.visual``), after PIL's ``convert("RGB")`` as torchvision's and
  webdataset's loaders do, so the pixels are those of ``create_model_and_transforms(...)`` +
  ``torchvision.datasets.ImageFolder``.

Evaluation (every path above except training) runs open_clip's own eval transform (``open_clip.image_transform_v2``)
of the record for both kinds: a vlp record is an open_clip ``preprocess_cfg`` (same size, resize mode,
interpolation, mean and std), so the open_clip folder ``vlp export`` writes preprocesses a decoded image into the
very tensor vlp evaluates. Its PIL steps (resize, crop, mode) run per sample and yield uint8 pixels; its
``ToTensor`` + ``Normalize`` run per batch (:meth:`Preprocess.normalize`) with the same element-wise operations, so
the result is bit-identical while loader workers ship a quarter of the bytes. Training (``train=True``) keeps vlp's
uint8 tensor transform (:class:`~vlp.data.transforms.ClipImageTransform`: random crops, and the same eval geometry
for ``data.augment=none`` computed with torchvision's tensor kernel, which rounds differently from PIL's by up to a
few levels of 255 on resampled images).

JPEG draft decoding (libjpeg's reduced-scale DCT: faster, slightly different pixels) is off unless a record says
``jpeg_draft=True``; only training sets it, from ``data.jpeg_draft``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from PIL import Image

from vlp.config import ModelConfig, PreprocessConfig
from vlp.data.decode import DecodeLimits, decode_image, decode_pixels, to_rgb
from vlp.data.transforms import ImageTransform, build_image_transform, normalize_batch, pil_to_uint8

ALPHA_POLICIES = ("white", "convert")
SOURCES = ("vlp", "open_clip")


@dataclass(frozen=True)
class Preprocess:
    """How one model turns encoded image bytes into its (3, H, W) input.

    Args:
        image_size: output side (or (H, W) for a non-square open_clip model).
        alpha: ``white`` (transparency composited onto white) or ``convert`` (PIL ``convert("RGB")``).
        resize: ``shortest`` (short side, then centre crop), ``squash``; open_clip also ``longest`` (pad).
        interpolation: ``bicubic`` or ``bilinear``.
        mean, std: per-channel normalisation on the 0-1 scale.
        jpeg_draft: decode JPEGs at the smallest DCT scale still >= the output size (training throughput only).
        source: ``vlp`` (vlp's uint8 transform, normalised per batch) or ``open_clip`` (open_clip's transform).
        fill_color: open_clip's padding value for ``resize='longest'``.
    """

    image_size: int | tuple[int, int]
    alpha: str = "white"
    resize: str = "shortest"
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = PreprocessConfig.mean
    std: tuple[float, ...] = PreprocessConfig.std
    jpeg_draft: bool = False
    source: str = "vlp"
    fill_color: int = 0

    def __post_init__(self) -> None:
        if self.alpha not in ALPHA_POLICIES or self.source not in SOURCES:
            raise ValueError(f"preprocess: alpha must be one of {ALPHA_POLICIES} and source one of {SOURCES}, got "
                             f"{self.alpha!r} / {self.source!r}")
        if self.source == "vlp" and not isinstance(self.image_size, int):
            raise ValueError(f"preprocess: vlp models are square, got image_size={self.image_size!r}")

    # ------------------------------------------------------------------------------------------ constructors
    @classmethod
    def from_model_config(cls, config: ModelConfig, *, jpeg_draft: bool = False) -> Preprocess:
        """The record a vlp model was trained with (``model.preprocess`` and ``model.image_size``)."""
        recorded = config.preprocess
        return cls(image_size=config.image_size, alpha=recorded.alpha, resize=recorded.resize,
                   interpolation=recorded.interpolation, mean=tuple(recorded.mean), std=tuple(recorded.std),
                   jpeg_draft=jpeg_draft)

    @classmethod
    def from_open_clip(cls, preprocess_cfg: dict) -> Preprocess:
        """open_clip's preprocessing of a model (its ``model.visual.preprocess_cfg``, an ``open_clip.PreprocessCfg``
        as a dict), with PIL's ``convert("RGB")`` before it as open_clip's evaluation loaders do."""
        size = preprocess_cfg["size"]
        size = size if isinstance(size, int) else tuple(int(s) for s in size)
        if isinstance(size, tuple) and size[0] == size[1]:
            size = size[0]
        return cls(image_size=size, alpha="convert", resize=preprocess_cfg.get("resize_mode", "shortest"),
                   interpolation=preprocess_cfg.get("interpolation", "bicubic"),
                   mean=tuple(float(v) for v in preprocess_cfg["mean"]),
                   std=tuple(float(v) for v in preprocess_cfg["std"]),
                   source="open_clip", fill_color=int(preprocess_cfg.get("fill_color", 0)))

    def for_evaluation(self) -> Preprocess:
        """The same record with JPEG draft decoding off (evaluation, index builds and search never use it)."""
        return dataclasses.replace(self, jpeg_draft=False)

    # ------------------------------------------------------------------------------------------------ use
    @property
    def height_width(self) -> tuple[int, int]:
        """(H, W) of the model input."""
        return (self.image_size, self.image_size) if isinstance(self.image_size, int) else self.image_size

    def decode(self, data: bytes, limits: DecodeLimits, ext: str | None) -> Image.Image:
        """Encoded bytes -> RGB PIL image under ``limits`` (pixel and byte caps), decoded only as the format the
        extension ``ext`` names (None: any format vlp reads), with this record's alpha policy and JPEG draft
        setting; :class:`~vlp.data.decode.SampleError` for a bad image."""
        draft = min(self.height_width) if self.jpeg_draft else None
        return decode_image(data, dataclasses.replace(limits, draft_size=draft), ext, alpha=self.alpha)

    def decode_pixels(self, data: bytes, limits: DecodeLimits, ext: str | None) -> torch.Tensor:
        """:meth:`decode` as a (3, H, W) uint8 tensor (JPEGs straight from torchvision's decoder, the same pixels),
        for vlp's uint8 transform (:class:`~vlp.data.transforms.ClipImageTransform`), which takes tensors."""
        draft = min(self.height_width) if self.jpeg_draft else None
        return decode_pixels(data, dataclasses.replace(limits, draft_size=draft), ext, alpha=self.alpha)

    def to_rgb(self, image: Image.Image) -> Image.Image:
        """An already decoded PIL image as RGB, with this record's alpha policy."""
        return to_rgb(image, self.alpha)

    def open_clip_cfg(self) -> dict:
        """The record as open_clip's ``preprocess_cfg`` (an ``open_clip.PreprocessCfg`` as a dict): what
        ``create_model_and_transforms`` builds the same eval transform from."""
        return {"size": self.image_size, "mode": "RGB", "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation, "resize_mode": self.resize, "fill_color": self.fill_color}

    def transform(self, augment: str = "none", train: bool = False) -> ImageTransform:
        """The per-sample transform: RGB PIL -> (3, H, W) uint8, normalised per batch by :meth:`normalize` (timm's
        training augmentation: normalised float32).

        Evaluation (``train=False``) and open_clip records: open_clip's eval transform of :meth:`open_clip_cfg` up to
        its pixels (:class:`OpenClipPixels`). Training of vlp records: vlp's uint8 transform, with the training
        augmentation ``augment`` (``none``: the eval geometry on uint8 tensors)."""
        if self.source == "open_clip" and train and augment != "none":
            raise ValueError("training augmentation is defined for vlp preprocessing records only")
        if self.source == "open_clip" or not train:
            from open_clip.transform import PreprocessCfg, image_transform_v2

            config = PreprocessCfg(**{**self.open_clip_cfg(), "mean": self.mean, "std": self.std})
            return OpenClipPixels(image_transform_v2(config, is_train=False))
        return build_image_transform(augment, self.image_size, train=train, interpolation=self.interpolation,
                                     resize=self.resize, mean=self.mean, std=self.std)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """A (B, 3, H, W) batch as the model's float32 input: uint8 pixels become ``ToTensor`` then ``Normalize`` with
        this record's mean and std, element for element as torchvision computes them (x / 255, then (x - mean) /
        std); float batches (already normalised per sample) pass unchanged."""
        return normalize_batch(images, self.mean, self.std) if images.dtype == torch.uint8 else images

    def collate(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Stack per-sample transform outputs into the model's float32 (B, 3, H, W) input."""
        return self.normalize(torch.stack(images))

    def as_dict(self) -> dict:
        """The record as plain JSON values (written into index manifests)."""
        values = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


class OpenClipPixels:
    """open_clip's eval transform up to its pixels: its PIL steps (resize, crop, ``convert``), then (3, H, W) uint8.

    The transform's last two steps must be ``ToTensor`` (uint8 / 255) and ``Normalize``; they are applied per batch
    by :meth:`Preprocess.normalize`. Anything else is refused rather than approximated."""

    def __init__(self, transform: object) -> None:
        from torchvision.transforms import Compose, Normalize, ToTensor

        steps = list(getattr(transform, "transforms", []))
        if len(steps) < 2 or not isinstance(steps[-2], ToTensor) or not isinstance(steps[-1], Normalize):
            raise ValueError(f"open_clip's eval transform does not end with ToTensor + Normalize: {transform}")
        self.pil_steps = Compose(steps[:-2])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return pil_to_uint8(self.pil_steps(image))
