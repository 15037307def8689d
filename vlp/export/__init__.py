"""Trained models leave vlp and come back: ``open_clip`` folders, Hugging Face ``transformers`` folders and ONNX.

``export_model(run, fmt, out)`` writes a folder the peer library loads with its own code (checked against vlp's
embeddings when written) and a model card; ``import_model(fmt, folder, out)`` turns an open_clip ``local-dir``
folder or a ``transformers`` ``CLIPModel`` folder into a vlp model directory (config.yaml + model.safetensors)
that ``vlp eval``, ``vlp index build`` and ``vlp train --init`` use.
"""

from vlp.export.api import FORMATS, export_model
from vlp.export.card import ExportResult
from vlp.export.common import ExportError
from vlp.export.importing import IMPORT_FORMATS, ImportResult, import_model

__all__ = ["FORMATS", "IMPORT_FORMATS", "ExportError", "ExportResult", "ImportResult", "export_model", "import_model"]
