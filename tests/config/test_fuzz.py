"""Property-based bad-input fuzzing: malformed configs, data files and CLI arguments must end in one
line naming the problem (EvoloraError / exit 2), never a traceback, and never change an existing file."""

import io
import json
import string
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evolora.config import build_config, load_config
from evolora.data import build_stream
from evolora.errors import EvoloraError

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])

VALID = {
    "name": "fuzz",
    "model": {"name": "tiny-llama", "dtype": "fp32"},
    "data": {"stream": "demo", "max_tasks": 1, "train_per_label": 1, "test_per_label": 1},
    "method": {"name": "seq_lora", "options": {"r": 2}},
    "train": {"epochs": 1, "batch_size": 2, "lr": 1e-3},
    "eval": {"mode": "loglik"},
    "output": {"dir": "run"},
}

junk = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                 st.text(max_size=20), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5),
                                                                                           st.integers(), max_size=2))
section_field = st.sampled_from([(s, f) for s, fields in {
    "model": ["dtype", "device", "chat_template", "trust_remote_code"],
    "data": ["stream", "order", "train_per_label", "test_per_label", "dev_per_label", "max_input_tokens",
             "max_tasks", "tasks"],
    "method": ["name", "options"],
    "train": ["epochs", "batch_size", "grad_accum", "lr", "weight_decay", "warmup_ratio", "schedule",
              "max_grad_norm", "mixed_precision", "checkpoint_every"],
    "eval": ["mode", "batch_size", "max_new_tokens", "future_tasks"],
    "output": ["overwrite", "keep_checkpoints"],
}.items() for f in fields])


def one_line(exc: Exception) -> None:
    message = str(exc)
    assert message and "\n" not in message and "Traceback" not in message


@FUZZ
@given(edits=st.lists(st.tuples(section_field, junk), min_size=1, max_size=3),
       extra_key=st.one_of(st.none(), st.text(string.ascii_lowercase, min_size=1, max_size=8)))
def test_mutated_configs_are_valid_or_one_line_errors(edits, extra_key):
    raw = json.loads(json.dumps(VALID))
    for (section, field), value in edits:
        raw[section][field] = value
    if extra_key and extra_key not in raw["train"]:
        raw["train"][extra_key] = 1
    try:
        config = build_config(raw, source="fuzz.yaml")
    except EvoloraError as exc:
        one_line(exc)
        assert str(exc).startswith("fuzz.yaml")
        return
    try:  # a config that validates must also build its stream or fail with one line
        build_stream(config.data)
    except EvoloraError as exc:
        one_line(exc)


@FUZZ
@given(text=st.text(max_size=200))
def test_random_yaml_files(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path)
    except EvoloraError as exc:
        one_line(exc)


ROW_VALUES = st.one_of(st.text(max_size=30), st.integers(), st.none(), st.lists(st.text(max_size=3), max_size=2))


def bad_olora_file():
    """A train.json that is broken in one of many ways."""
    rows = st.lists(st.fixed_dictionaries({}, optional={"sentence": ROW_VALUES, "label": ROW_VALUES,
                                                        "extra": ROW_VALUES}), max_size=5)
    as_json = rows.map(lambda r: json.dumps(r, indent=1).encode())
    truncated = as_json.flatmap(lambda b: st.integers(0, max(0, len(b) - 1)).map(lambda n: b[:n]))
    bad_bytes = st.binary(max_size=80)
    latin1 = st.text(alphabet="éàüß€", min_size=1, max_size=10).map(
        lambda t: json.dumps([{"sentence": t, "label": "pos"}], ensure_ascii=False).encode("cp1252"))
    huge_line = st.integers(100_000, 300_000).map(
        lambda n: json.dumps([{"sentence": "x" * n, "label": "unknown"}]).encode())
    empty = st.just(b"[]")
    return st.one_of(as_json, truncated, bad_bytes, latin1, huge_line, empty)


@FUZZ
@given(content=bad_olora_file(), which=st.sampled_from(["train.json", "test.json", "labels.json"]))
def test_malformed_task_files(tmp_path, content, which):
    folder = tmp_path / "task"
    folder.mkdir(exist_ok=True)
    good = json.dumps([{"sentence": "a", "label": "pos"}, {"sentence": "b", "label": "neg"}])
    (folder / "train.json").write_text(good)
    (folder / "test.json").write_text(good)
    (folder / "labels.json").write_text(json.dumps(["pos", "neg"]))
    (folder / which).write_bytes(content)
    config = build_config({**VALID, "data": {"stream": "custom",
                                             "tasks": [{"name": "t", "format": "olora", "path": str(folder)}]}})
    try:
        tasks = build_stream(config.data)
    except EvoloraError as exc:
        one_line(exc)
        return
    assert tasks[0].train and tasks[0].test  # accepted only when it really is a usable task


@FUZZ
@given(lines=st.lists(st.one_of(st.text(max_size=40), st.dictionaries(st.sampled_from(["input", "output", "x"]),
                                                                      ROW_VALUES, max_size=3).map(json.dumps)),
                      max_size=6))
def test_malformed_jsonl(tmp_path, lines):
    (tmp_path / "train.jsonl").write_text("\n".join(lines), encoding="utf-8")
    (tmp_path / "test.jsonl").write_text(json.dumps({"input": "a", "output": "b"}))
    config = build_config({**VALID, "data": {"stream": "custom",
                                             "tasks": [{"name": "t", "format": "jsonl", "path": str(tmp_path)}]}})
    try:
        build_stream(config.data)
    except EvoloraError as exc:
        one_line(exc)


def run_cli(args: list[str]) -> tuple[int, str]:
    from evolora.cli import main

    err, out = io.StringIO(), io.StringIO()
    old = sys.argv
    sys.argv = ["evolora", *args]
    try:
        with redirect_stderr(err), redirect_stdout(out):
            try:
                main()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = old
    return code, err.getvalue()


def snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@FUZZ
@given(command=st.sampled_from(["run", "eval", "report", "bench"]),
       args=st.lists(st.one_of(st.sampled_from(["--set", "--out", "--resume", "--only", "--mode", "train.lr=x",
                                                "nope.yaml", "data.stream=zzz", "--bogus", "bad.yaml"]),
                               st.text(string.ascii_letters + "=.-/", max_size=12)), max_size=4))
def test_cli_arguments(tmp_path, command, args):
    (tmp_path / "bad.yaml").write_text("train: {lr: [}\n")
    existing = tmp_path / "keep" / "metrics.json"
    existing.parent.mkdir(exist_ok=True)
    existing.write_text('{"important": true}')
    before = snapshot(tmp_path)
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        code, stderr = run_cli([command, *args])
    finally:
        os.chdir(cwd)
    assert code != 0
    assert "Traceback" not in stderr
    lines = [x for x in stderr.strip().splitlines() if x.strip()]
    if code == 2 and lines and lines[0].startswith("error: "):
        assert len(lines) == 1
    assert snapshot(tmp_path) == before
