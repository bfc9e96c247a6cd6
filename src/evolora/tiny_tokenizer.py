"""A byte-level tokenizer with the small part of the HF tokenizer interface evolora uses; it pairs
with the tiny random Llama so tests need no download."""

from __future__ import annotations


class ByteTokenizer:
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    pad_token, bos_token, eos_token = "<pad>", "<s>", "</s>"
    chat_template = None
    add_bos_token = True
    offset = 3
    vocab_size = 256 + offset

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = [b + self.offset for b in text.encode("utf-8")]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        data = bytes(i - self.offset for i in ids if i >= self.offset)
        return data.decode("utf-8", errors="replace")

    def save_pretrained(self, path) -> None:  # nothing to save: it is fully defined by this class
        pass
