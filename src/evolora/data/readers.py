"""Readers for the three task formats. Every malformed input raises DataError naming file:line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional

from evolora.config import TaskSource
from evolora.data.tasks import Example, Task
from evolora.errors import DataError

MAX_LABELS_FOR_SCORING = 64


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8") from None


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def iter_json_array(path: Path) -> Iterator[tuple[int, object]]:
    """Yields (line, element) for each element of a top-level JSON list."""
    text = _read_text(path)
    decoder = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    if not text.startswith("[", pos):
        raise DataError(f"{path}:{_line_of(text, pos)}: expected a JSON list of objects")
    pos += 1
    expect_value = True
    while True:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if pos >= len(text):
            raise DataError(f"{path}:{_line_of(text, pos)}: unterminated JSON list")
        if text[pos] == "]":
            rest = text[pos + 1:].strip()
            if rest:
                raise DataError(f"{path}:{_line_of(text, pos + 1)}: extra data after the JSON list")
            return
        if not expect_value:
            if text[pos] != ",":
                raise DataError(f"{path}:{_line_of(text, pos)}: expected ',' or ']' in the JSON list")
            pos += 1
            expect_value = True
            continue
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        except RecursionError:
            raise DataError(f"{path}:{_line_of(text, pos)}: JSON nested too deeply") from None
        yield _line_of(text, pos), value
        pos, expect_value = end, False


def iter_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    """(line, value) of every non-empty line. Lines end at `\n` only: JSON strings may hold U+2028, U+0085
    and other characters that str.splitlines() would split at."""
    for lineno, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
        except RecursionError:
            raise DataError(f"{path}:{lineno}: JSON nested too deeply") from None


def _string_field(path: Path, line: int, row: object, key: str, required: bool = True) -> Optional[str]:
    if not isinstance(row, dict):
        raise DataError(f"{path}:{line}: expected a JSON object, got {type(row).__name__}")
    value = row.get(key)
    if value is None:
        if required:
            raise DataError(f"{path}:{line}: missing key '{key}'")
        return None
    if not isinstance(value, str):
        raise DataError(f"{path}:{line}: '{key}' must be a string, got {type(value).__name__}")
    return value


def _choices_field(path: Path, line: int, row: dict, answer: str) -> Optional[tuple[str, ...]]:
    """A row's own answer options (`choices`: two or more distinct strings, the answer among them), or None."""
    choices = row.get("choices")
    if choices is None:
        return None
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise DataError(f"{path}:{line}: 'choices' must be a list of two or more non-empty strings")
    if len(set(choices)) != len(choices):
        raise DataError(f"{path}:{line}: 'choices' holds the same option twice")
    if answer not in choices:
        raise DataError(f"{path}:{line}: the answer {answer[:80]!r} is not one of its 'choices'")
    return tuple(choices)


def _check_labels(path: Path, line: int, label: str, labels: list[str]) -> None:
    if labels and label not in labels:
        shown = ", ".join(repr(x) for x in labels[:8]) + (" ..." if len(labels) > 8 else "")
        raise DataError(f"{path}:{line}: label {label!r} is not in labels.json ({shown})")


def read_labels(path: Path) -> list[str]:
    labels = []
    for line, value in iter_json_array(path):
        if not isinstance(value, str) or not value:
            raise DataError(f"{path}:{line}: each label must be a non-empty string")
        labels.append(value)
    if not labels:
        raise DataError(f"{path}: no labels")
    if len(set(labels)) != len(labels):
        raise DataError(f"{path}: duplicate labels")
    return labels


def read_olora_split(path: Path, labels: list[str]) -> list[Example]:
    examples = []
    for line, row in iter_json_array(path):
        sentence = _string_field(path, line, row, "sentence")
        label = _string_field(path, line, row, "label")
        choices = _choices_field(path, line, row, label)
        if choices is None:
            _check_labels(path, line, label, labels)
        examples.append(Example(sentence, label, choices=choices))
    return examples


def read_choice_task(folder: Path) -> Task:
    """A multiple-choice evaluation task (e.g. a general-knowledge probe): `test.json` rows with
    `sentence`, `choices` and `label`; never trained on, so no train split is needed."""
    folder = Path(folder)
    path = folder / "test.json" if folder.is_dir() else folder
    test = read_olora_split(path, [])
    if not test:
        raise DataError(f"{path}: no questions")
    missing = next((i for i, ex in enumerate(test) if ex.choices is None), None)
    if missing is not None:
        raise DataError(f"{path}: question {missing + 1} has no 'choices' (a multiple-choice task needs them)")
    return Task(folder.name if folder.is_dir() else folder.stem, "", [], [], test)


def read_olora_task(name: str, folder: Path, instruction: str) -> Task:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: task folder not found (task '{name}')")
    labels = read_labels(folder / "labels.json")
    train = read_olora_split(folder / "train.json", labels)
    test = read_olora_split(folder / "test.json", labels)
    return _nonempty(Task(name, instruction, labels, train, test), folder)


def read_jsonl_split(path: Path, labels: list[str], fields: tuple[str, str, str] = ("input", "output", "instruction"),
                     rows=None) -> list[Example]:
    """Rows with an input, an output and optionally their own instruction, under the field names given
    (Alpaca-style data: instruction/input/output as they are). `rows` replaces reading `path` as JSONL."""
    input_field, output_field, instruction_field = fields
    examples = []
    for line, row in rows if rows is not None else iter_jsonl(path):
        text = _string_field(path, line, row, input_field)
        answer = _string_field(path, line, row, output_field)
        instruction = _string_field(path, line, row, instruction_field, required=False)
        choices = _choices_field(path, line, row, answer)
        if choices is None:
            _check_labels(path, line, answer, labels)
        examples.append(Example(text, answer, instruction, choices))
    return examples


def _infer_labels(examples: list[Example]) -> list[str]:
    if all(ex.choices for ex in examples):  # every example brings its own options
        return []
    outputs = sorted({ex.output for ex in examples})
    return outputs if len(outputs) <= MAX_LABELS_FOR_SCORING else []


def read_jsonl_task(source: TaskSource) -> Task:
    path = Path(source.path)
    if path.is_dir():
        train_path, test_path = path / "train.jsonl", path / "test.jsonl"
    else:
        train_path = path
        if not source.test_path:
            raise DataError(f"task '{source.name}': `test_path` is needed when `path` is a file")
        test_path = Path(source.test_path)
    labels = list(source.labels or [])
    fields = (source.input_field, source.output_field, source.instruction_field)
    train = read_jsonl_split(train_path, labels, fields)
    test = read_jsonl_split(test_path, labels, fields)
    if not labels:
        labels = _infer_labels(train + test)
    return _nonempty(Task(source.name, source.instruction or "", labels, train, test), path)


def read_trace_task(source: TaskSource) -> Task:
    """The TRACE benchmark's layout: a folder with train.json, eval.json (the dev split) and test.json, each a
    JSON list of {"prompt", "answer"} (the prompt carries its instruction). Free-form answers are generated."""
    folder = Path(source.path)
    fields = (source.input_field if source.input_field != "input" else "prompt",
              source.output_field if source.output_field != "output" else "answer", source.instruction_field)
    labels = list(source.labels or [])

    def split(name: str, required: bool = True) -> list[Example]:
        path = folder / name
        if not path.is_file():
            if required:
                raise DataError(f"{path}: not found (a TRACE task folder holds train.json, eval.json, test.json)")
            return []
        return read_jsonl_split(path, labels, fields, rows=iter_json_array(path))

    train, dev, test = split("train.json"), split("eval.json", required=False), split("test.json")
    if not labels:
        labels = _infer_labels(train + test)
    return _nonempty(Task(source.name, source.instruction or "", labels, train, test, dev), folder)


def read_hf_task(source: TaskSource) -> Task:
    try:
        import datasets
    except ImportError:
        raise DataError("the `datasets` package is needed for format hf: pip install datasets") from None
    kwargs = {"data_files": source.data_files} if source.data_files else {}
    splits = {}
    for split in (source.train_split, source.test_split):
        try:
            splits[split] = datasets.load_dataset(source.dataset, source.dataset_config, split=split, **kwargs)
        except Exception as exc:  # datasets raises many types; the user needs the message, not the type
            raise DataError(f"task '{source.name}': cannot load {source.dataset} split {split}: "
                            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    train_ds = splits[source.train_split]
    features = train_ds.features
    for column in (source.text_column, source.label_column):
        if column not in features:
            raise DataError(f"task '{source.name}': column '{column}' not in {source.dataset} "
                            f"(columns: {', '.join(features)})")
    label_feature = features[source.label_column]
    names = list(getattr(label_feature, "names", None) or source.labels or [])

    def convert(ds, split) -> list[Example]:
        out = []
        for i, row in enumerate(ds):
            text, label = row[source.text_column], row[source.label_column]
            if isinstance(label, int) and names:
                if not 0 <= label < len(names):
                    raise DataError(f"task '{source.name}': {split} row {i}: label id {label} out of range")
                label = names[label]
            if not isinstance(text, str):
                raise DataError(f"task '{source.name}': {split} row {i}: '{source.text_column}' is not text")
            label = str(label)
            choices = None
            if source.choices_column:
                choices = row.get(source.choices_column)
                if not isinstance(choices, list) or len(choices) < 2 or label not in [str(c) for c in choices]:
                    raise DataError(f"task '{source.name}': {split} row {i}: '{source.choices_column}' must list two "
                                    f"or more options, the label among them")
                choices = tuple(str(c) for c in choices)
            elif names and label not in names:
                raise DataError(f"task '{source.name}': {split} row {i}: label {label!r} is not a known label")
            out.append(Example(text, label, choices=choices))
        return out

    train = convert(train_ds, source.train_split)
    test = convert(splits[source.test_split], source.test_split)
    labels = names or _infer_labels(train + test)
    return _nonempty(Task(source.name, source.instruction or "", labels, train, test), source.dataset)


def _nonempty(task: Task, where) -> Task:
    if not task.train:
        raise DataError(f"{where}: task '{task.name}' has no training examples")
    if not task.test:
        raise DataError(f"{where}: task '{task.name}' has no test examples")
    return task


def read_task(source: TaskSource) -> Task:
    if source.format == "olora":
        return read_olora_task(source.name, Path(source.path), source.instruction or "")
    if source.format == "jsonl":
        return read_jsonl_task(source)
    if source.format == "trace":
        return read_trace_task(source)
    return read_hf_task(source)
