"""General (task-free) text: for replay (GeRe) and for measuring general language ability as held-out
perplexity. A file is JSONL with a `text` field per line."""

from __future__ import annotations

from pathlib import Path

from evolora.data.readers import _string_field, iter_jsonl
from evolora.errors import DataError


def read_texts(path: str | Path, limit: int | None = None) -> list[str]:
    """The first `limit` non-empty texts of a JSONL file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: general text file not found")
    texts = []
    for line, row in iter_jsonl(path):
        text = _string_field(path, line, row, "text")
        if text.strip():
            texts.append(text.strip())
        if limit is not None and len(texts) >= limit:
            break
    if not texts:
        raise DataError(f"{path}: no texts (expected JSON lines with a non-empty 'text' field)")
    return texts


def encode_texts(tokenizer, texts: list[str], max_tokens: int) -> list[list[int]]:
    """Token ids of each text, cut to `max_tokens`; texts shorter than 2 tokens are dropped."""
    encoded = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"][:max_tokens]
        if len(ids) >= 2:
            encoded.append(list(ids))
    return encoded
