"""The one JSON Lines reader and writer (eval answer files, run logs, LLaVA .jsonl data); stdlib only, so every
layer can use it."""
from __future__ import annotations

import json
import os
from typing import Iterable


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a jsonl file; a bad line is an error naming the file and line number."""
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from e
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            records.append(rec)
    return records


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
