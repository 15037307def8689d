"""Data: shard layout, writer, checker, streaming loader, transforms, tokenizers, demo data sets."""
