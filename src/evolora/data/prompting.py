"""Prompt format of the benchmark: instruction, options, input, answer cue. The input is truncated,
never the instruction or the answer; training targets are the answer tokens plus EOS."""

from __future__ import annotations

from dataclasses import dataclass

from evolora.data.tasks import Example, Task

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    """prompt + answer (+ EOS) for training; the prompt alone for evaluation."""
    prompt_len: int
    task_index: int


class PromptBuilder:
    def __init__(self, tokenizer, max_input_tokens: int, chat_template: bool = False):
        self.tokenizer = tokenizer
        self.max_input_tokens = max_input_tokens
        self.use_chat = chat_template and getattr(tokenizer, "chat_template", None) is not None
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token")
        self.eos_id = tokenizer.eos_token_id
        self._cache: dict[str, list[int]] = {}

    def _ids(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(self._cache) < 4096:
                self._cache[text] = ids
        return ids

    @staticmethod
    def header(task: Task, example: Example) -> str:
        instruction = example.instruction if example.instruction is not None else task.instruction
        offered = example.choices or task.labels
        options = f"Option: {', '.join(offered)} \n" if offered else ""
        return instruction + options

    def prompt_ids(self, task: Task, example: Example) -> list[int]:
        body = self.tokenizer(example.input, add_special_tokens=False)["input_ids"][: self.max_input_tokens]
        if self.use_chat:
            text = self.header(task, example) + self.tokenizer.decode(body)
            rendered = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
            return self.tokenizer(rendered, add_special_tokens=False)["input_ids"]
        bos = [self.tokenizer.bos_token_id] if getattr(self.tokenizer, "add_bos_token", False) \
            and self.tokenizer.bos_token_id is not None else []
        return bos + self._ids(self.header(task, example)) + body + self._ids("\nAnswer:")

    def answer_ids(self, answer: str) -> list[int]:
        """The target continuation: the answer then EOS (a chat model's end-of-turn token)."""
        text = answer if self.use_chat else " " + answer
        return self._ids(text) + [self.eos_id]

    def encode_train(self, task: Task, example: Example, task_index: int) -> Encoded:
        prompt = self.prompt_ids(task, example)
        return Encoded(prompt + self.answer_ids(example.output), len(prompt), task_index)

    def encode_prompt(self, task: Task, example: Example, task_index: int) -> Encoded:
        prompt = self.prompt_ids(task, example)
        return Encoded(prompt, len(prompt), task_index)

    def decode_answer(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()
