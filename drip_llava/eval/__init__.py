"""Evaluation: answer generation, LLaVA-Bench (LLM judge) and ScienceQA scoring.

Shared helpers for the LLaVA jsonl files (read with drip_llava.jsonl) live here so every benchmark pairs records
the same way:
by ``question_id`` (compared as strings, so 12 and "12" match), never by line order.
"""

from __future__ import annotations

import os
from typing import Iterable


def qid_key(question_id) -> str:
    """Canonical pairing key: LLaVA files mix int and str question ids."""
    return str(question_id)


def index_by_question_id(records: Iterable[dict], path: str | os.PathLike, field: str = "text") -> dict[str, dict]:
    """Map question_id -> record. A repeated id with the same ``field`` is tolerated (a resumed run
    may repeat a line); with a different value it is ambiguous, so it is an error."""
    out: dict[str, dict] = {}
    for i, rec in enumerate(records, 1):
        if "question_id" not in rec:
            raise ValueError(f"{path}: record {i} has no 'question_id': {str(rec)[:200]}")
        key = qid_key(rec["question_id"])
        if key in out and out[key].get(field) != rec.get(field):
            raise ValueError(f"{path}: question_id {key!r} appears twice with different {field!r}")
        out[key] = rec
    return out

