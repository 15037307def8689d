"""What ``vlp search`` and ``vlp index build`` print, from the library's results (no model needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlp.retrieval.build import BuildReport
from vlp.retrieval.index import QueryError, SearchHit
from vlp.retrieval.search import QueryResult, search_index

HITS = [
    SearchHit(3, "000000003", 0.87654321, {"key": "000000003", "caption": "a red kangaroo", "shard": "s.tar",
                                           "member": "000000003.jpg"}),
    SearchHit(7, "k7", -0.1234567, {"key": "k7", "path": "/img/x.png"}),
    SearchHit(9, "k9", 0.5, {"key": "k9", "caption": "", "member": "m.png"}),
]


def test_query_result_as_json_line() -> None:
    line = QueryResult("kangaroo", HITS).to_json()
    assert "\n" not in line
    assert json.loads(line) == {"query": "kangaroo", "results": [
        {"rank": 1, "row": 3, "key": "000000003", "score": 0.876543, "caption": "a red kangaroo", "shard": "s.tar",
         "member": "000000003.jpg"},
        {"rank": 2, "row": 7, "key": "k7", "score": -0.123457, "path": "/img/x.png"},
        {"rank": 3, "row": 9, "key": "k9", "score": 0.5, "caption": "", "member": "m.png"}]}


def test_query_result_as_table_shows_the_caption_else_the_source() -> None:
    assert QueryResult("kangaroo", HITS).format().splitlines() == [
        "query: kangaroo",
        "  rank     score  key            caption / source",
        "     1    0.8765  000000003      a red kangaroo",
        "     2   -0.1235  k7             /img/x.png",
        "     3    0.5000  k9             m.png",
    ]


def test_build_report_summary() -> None:
    fresh = BuildReport(21, 21, 3, 0, {}, 1.0, 123.4)
    assert fresh.summary("idx") == ("21 images, 21 captions in idx: 3 parts embedded (123 images/s), 0 already done; "
                                    "skipped: none")
    resumed = BuildReport(5, 2, 0, 2, {"decode_error": 1}, 0.0, 0.0, ["hnsw.faiss", "ivfpq.faiss"])
    assert resumed.summary("out") == ("5 images, 2 captions in out: 0 parts embedded (0 images/s), 2 already done; "
                                      "skipped: {'decode_error': 1}; back ends: hnsw.faiss, ivfpq.faiss")


@pytest.mark.parametrize("queries", [{}, {"texts": ["a"], "images": ["b.png"]}])
def test_search_index_takes_texts_or_images(queries: dict, tmp_path: Path) -> None:
    with pytest.raises(QueryError, match="exactly one of texts or images"):
        search_index(tmp_path, **queries)
