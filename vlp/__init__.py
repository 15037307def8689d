"""vlp: vision-language contrastive pretraining (CLIP and ALBEF families)."""

__version__ = "0.1.0"

__all__ = ["__version__", "create_model", "list_models"]


def __getattr__(name: str):  # noqa: ANN202 - lazy: `import vlp` stays light (no torch, timm, open_clip)
    if name in ("create_model", "list_models"):
        import vlp.models

        return getattr(vlp.models, name)
    raise AttributeError(f"module 'vlp' has no attribute {name!r}")
