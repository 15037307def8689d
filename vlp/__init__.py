"""vlp: vision-language contrastive pretraining (CLIP and ALBEF families)."""

__version__ = "0.1.0"
