"""``vlp search`` as one call: load an index, answer text or image queries, and the text the command prints.

:func:`search_index` loads the index (:meth:`Index.load`, its model checked by fingerprint) and returns one
:class:`QueryResult` per query, in query order; :meth:`QueryResult.to_json` is one JSON line (every hit with its
rank, row, key, score and metadata) and :meth:`QueryResult.format` a small table for a person.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vlp.retrieval.index import Index, QueryError, SearchHit, Target


@dataclass(frozen=True)
class QueryResult:
    """One query (the text, or the image file as given) and its hits, best first."""

    query: str
    hits: list[SearchHit]

    def to_json(self) -> str:
        """One JSON object: ``{"query", "results": [{rank, row, key, score (6 decimals), **metadata}, ...]}``."""
        return json.dumps({"query": self.query, "results": [
            {"rank": n + 1, "row": h.row, "key": h.key, "score": round(h.score, 6), **h.metadata}
            for n, h in enumerate(self.hits)]})

    def format(self) -> str:
        """``query: ...`` then one line per hit: rank, score, key and the caption (else the image's source)."""
        lines = [f"query: {self.query}", f"  {'rank':>4}  {'score':>8}  {'key':<14} caption / source"]
        for n, hit in enumerate(self.hits):
            where = hit.metadata.get("caption") or hit.metadata.get("path") or hit.metadata.get("member", "")
            lines.append(f"  {n + 1:>4}  {hit.score:8.4f}  {hit.key:<14} {where}")
        return "\n".join(lines)


def search_index(directory: str | Path, *, texts: Sequence[str] | None = None, images: Sequence[str] | None = None,
                 k: int = 10, target: Target = "image", rerank: int = 0, checkpoint: str | None = None,
                 backend: str = "exact") -> list[QueryResult]:
    """The top ``k`` rows of ``target`` in the index at ``directory`` for each of ``texts`` or ``images`` (image
    files), through ``backend`` (``exact`` or a faiss back end built with the index); ``rerank=K`` rescores the top
    K with the ITM head; ``checkpoint``: the index's model, if it moved. Raises the index's errors
    (``IndexStoreError``, ``SearchBackendError``, ``QueryError``, ``ConfigError``, ``FileNotFoundError``)."""
    if (texts is None) == (images is None):
        raise QueryError("give exactly one of texts or images")
    index = Index.load(directory, checkpoint=checkpoint, backend=backend)
    hits = index.search(texts=texts, images=images, k=k, target=target, rerank=rerank)
    return [QueryResult(str(query), found) for query, found in zip(texts or images, hits, strict=True)]
