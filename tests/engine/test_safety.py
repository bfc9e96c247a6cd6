"""The safety rules: evolora never deletes or replaces a file it cannot prove it made, a received run folder
cannot turn on code execution, and bad input of every class ends in one bounded line (exit 2, no traceback,
no file changed)."""

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest
import yaml
from test_fuzz import run_cli, snapshot

from evolora.config import build_config
from evolora.engine import run
from evolora.errors import EvoloraError
from evolora.runfolder import MARKER, RunLock

SUITE_RUN = {"method": "seq_lora"}


def write_config(tmp_path: Path, raw: dict, name="config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def user_folder(path: Path) -> dict:
    path.mkdir(parents=True, exist_ok=True)
    (path / "thesis.tex").write_text("my only copy")
    (path / "data").mkdir(exist_ok=True)
    (path / "data" / "train.json").write_text("[1, 2, 3]")
    return snapshot(path)


def one_bounded_line(code: int, stderr: str) -> str:
    lines = [x for x in stderr.strip().splitlines() if x.strip()]
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    assert len(lines[0]) <= 300 + len("error: ")
    return lines[0]


# --- data loss ------------------------------------------------------------------------------------

def test_demo_out_on_a_users_folder_leaves_every_file(tmp_path):
    before = user_folder(tmp_path / "mine")
    line = one_bounded_line(*run_cli(["demo", "--out", str(tmp_path / "mine")]))
    assert "not a run folder evolora made" in line
    assert snapshot(tmp_path / "mine") == before


def test_overwrite_never_touches_a_folder_evolora_did_not_mark(tmp_path, tiny_config):
    before = user_folder(tmp_path / "data_folder")
    raw = tiny_config(tmp_path, output={"dir": str(tmp_path / "data_folder"), "overwrite": True})
    line = one_bounded_line(*run_cli(["run", str(write_config(tmp_path, raw))]))
    assert "data_folder" in line and MARKER in line
    assert snapshot(tmp_path / "data_folder") == before


def test_overwrite_validates_the_new_run_before_it_deletes_the_old_one(tmp_path, tiny_config):
    raw = tiny_config(tmp_path, output={"dir": str(tmp_path / "run"), "tensorboard": False})
    run(build_config(raw))
    before = snapshot(tmp_path / "run")
    typo = tiny_config(tmp_path, data={"stream": "custom", "tasks": [
        {"name": "t", "format": "olora", "path": str(tmp_path / "no_such_task")}]},
        output={"dir": str(tmp_path / "run"), "overwrite": True})
    line = one_bounded_line(*run_cli(["run", str(write_config(tmp_path, typo))]))
    assert "no_such_task" in line
    assert snapshot(tmp_path / "run") == before  # the finished run is intact, byte for byte
    run(build_config({**raw, "output": {**raw["output"], "overwrite": True}}))  # a valid overwrite still works
    assert (tmp_path / "run" / MARKER).is_file()


def test_overwrite_refuses_a_marked_run_folder_holding_a_users_file(tmp_path, tiny_config):
    raw = tiny_config(tmp_path)
    run(build_config(raw))
    (tmp_path / "run" / "notes.md").write_text("mine")
    before = snapshot(tmp_path / "run")
    with pytest.raises(EvoloraError, match="holds 'notes.md'"):
        run(build_config({**raw, "output": {**raw["output"], "overwrite": True}}))
    assert snapshot(tmp_path / "run") == before


@pytest.mark.parametrize("name", ["/tmp/elsewhere", "../../x", "..", ".hidden", "a/b", "a\\b", ""])
def test_a_name_never_becomes_a_path(tmp_path, tiny_config, name):
    raw = tiny_config(tmp_path)
    raw["name"] = name
    raw["output"].pop("dir")
    line = one_bounded_line(*run_cli(["run", str(write_config(tmp_path, raw))]))
    assert "name:" in line and "plain name" in line


def test_bench_never_replaces_a_folder_it_did_not_make(tmp_path, tiny_config):
    base = tiny_config(tmp_path)
    base["output"].pop("dir")
    write_config(tmp_path, base, "base.yaml")
    suite = {"name": "s", "base": "base.yaml", "runs_dir": str(tmp_path / "runs"), "runs": [SUITE_RUN]}
    write_config(tmp_path, suite, "suite.yaml")
    before = user_folder(tmp_path / "runs" / "s" / "seq_lora")
    line = one_bounded_line(*run_cli(["bench", str(tmp_path / "suite.yaml"), "--results-md",
                                      str(tmp_path / "RESULTS.md")]))
    assert "not a run folder evolora made" in line
    assert snapshot(tmp_path / "runs" / "s" / "seq_lora") == before


@pytest.mark.parametrize("field, value, message", [
    ("name", "../../etc", "name: '../../etc' is not a plain name"),
    ("results", "/abs/results", "results: '/abs/results' must be a folder inside"),
    ("results", "../outside", "results: '../outside' must be a folder inside"),
])
def test_suite_names_and_results_stay_in_their_folder(tmp_path, field, value, message):
    suite = {"name": "s", "base": "base.yaml", "runs": [SUITE_RUN], field: value}
    code, stderr = run_cli(["bench", str(write_config(tmp_path, suite, "suite.yaml")), "--table-only"])
    assert message in one_bounded_line(code, stderr)


def test_a_run_that_fails_before_it_starts_leaves_no_folder(tmp_path, tiny_config):
    raw = tiny_config(tmp_path, data={"stream": "custom", "tasks": [
        {"name": "t", "format": "olora", "path": str(tmp_path / "missing")}]}, output={"dir": str(tmp_path / "new")})
    one_bounded_line(*run_cli(["run", str(write_config(tmp_path, raw))]))
    assert not (tmp_path / "new").exists()


# --- the lock ---------------------------------------------------------------------------------------

def _contend(run_dir: str, holders: str, trials: int, queue) -> None:
    """Takes the lock `trials` times; while holding it, claims a token file that only one holder may own."""
    overlaps = taken = 0
    for _ in range(trials):
        try:
            with RunLock(Path(run_dir)):
                taken += 1
                try:
                    fd = os.open(os.path.join(holders, "token"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    overlaps += 1
                    continue
                time.sleep(0.002)
                os.close(fd)
                os.unlink(os.path.join(holders, "token"))
        except EvoloraError:
            time.sleep(0.001)
    queue.put((overlaps, taken))


def test_the_lock_never_has_two_holders(tmp_path):
    run_dir, holders = tmp_path / "run", tmp_path / "holders"
    run_dir.mkdir()
    holders.mkdir()
    (run_dir / ".lock").write_text("999999")  # a stale lock left by a process that died
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(str(run_dir), str(holders), 60, queue)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert sum(o for o, _ in results) == 0
    assert sum(t for _, t in results) >= 4  # the stale lock was taken over, and taken again after each release


def test_a_held_lock_names_its_holder(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(EvoloraError, match=f"in use by process {os.getpid()}"):
            with RunLock(tmp_path):
                pass
    with RunLock(tmp_path):  # released on exit
        pass


# --- trust ------------------------------------------------------------------------------------------

def remote_code_model(tmp_path: Path) -> Path:
    folder = tmp_path / "evil_model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel",
                     "AutoTokenizer": ["evil.EvilTokenizer", None]}}))
    (folder / "evil.py").write_text(f"open({str(tmp_path / 'EXECUTED')!r}, 'w').write('ran')\n")
    return folder


def test_eval_of_a_received_run_folder_runs_no_code_it_asks_for(tmp_path, tiny_config):
    raw = tiny_config(tmp_path)
    run(build_config(raw))
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    saved["model"].update({"name": str(remote_code_model(tmp_path)), "trust_remote_code": True, "allow_pickle": True})
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(saved))
    before = snapshot(tmp_path / "run")
    for command in (["eval", str(tmp_path / "run")], ["predict", str(tmp_path / "run"), "--text", "hi", "--task", "x"]):
        line = one_bounded_line(*run_cli(command))
        assert "evil_model" in line
        assert not (tmp_path / "EXECUTED").exists()
    assert snapshot(tmp_path / "run") == before


# --- one bounded line for every class of bad input ---------------------------------------------------

def bad_config_cases(tmp_path, tiny_config):
    model_dir = tmp_path / "bad_model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{not json")
    deep = tmp_path / "deep.yaml"
    deep.write_text("name: " + "[" * 20000 + "]" * 20000 + "\n")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text('a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
                    + "".join(f"{c}: &{c} [{','.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
                    + "name: *i\n")
    dup = tmp_path / "dup.yaml"
    dup.write_text("name: one\nname: two\n")
    return [
        ({"train": {"epochs": float("inf")}}, "train.epochs"),
        ({"train": {"epochs": 1e15}}, "train.epochs"),
        ({"train": {"seed": -1}}, "train.seed"),
        ({"method": {"name": "seq_lora", "options": {"target_modules": ["input_layernorm"]}}}, "target_modules"),
        ({"model": {"name": str(model_dir), "dtype": "fp32"}}, "bad_model"),
        ({"output": {"dir": str(tmp_path / "a_file")}}, "is a file"),
        (deep, "nested too deeply"),
        (bomb, "name"),
        (dup, "duplicate key 'name'"),
    ]


def test_every_class_of_bad_config_is_one_bounded_line(tmp_path, tiny_config):
    (tmp_path / "a_file").write_text("keep")
    for i, (case, expected) in enumerate(bad_config_cases(tmp_path, tiny_config)):
        if isinstance(case, Path):
            path = case
        else:
            raw = tiny_config(tmp_path)
            for section, values in case.items():
                raw[section] = {**raw[section], **values}
            path = write_config(tmp_path, raw, f"case{i}.yaml")
        before = snapshot(tmp_path)
        line = one_bounded_line(*run_cli(["run", str(path)]))
        assert expected in line, (case, line)
        assert snapshot(tmp_path) == before, case


def test_run_folder_files_of_the_wrong_shape_are_one_line(tmp_path, tiny_config):
    raw = tiny_config(tmp_path)
    run(build_config(raw))
    config = write_config(tmp_path, raw)
    for name, content, command in [
        ("metrics.json", "[]", ["report", str(tmp_path / "run")]),
        ("metrics.json", '{"R": 3}', ["report", str(tmp_path / "run")]),
        ("progress.json", '["x"]', ["run", str(config), "--resume", str(tmp_path / "run")]),
        ("progress.json", "[" * 50000, ["run", str(config), "--resume", str(tmp_path / "run")]),
    ]:
        original = (tmp_path / "run" / name).read_bytes()
        (tmp_path / "run" / name).write_text(content)
        before = snapshot(tmp_path)
        line = one_bounded_line(*run_cli(command))
        assert name in line
        assert snapshot(tmp_path) == before
        (tmp_path / "run" / name).write_bytes(original)


def test_eval_after_the_runs_config_was_edited_is_one_line(tmp_path, tiny_config):
    raw = tiny_config(tmp_path, method={"options": {"r": 4}})
    run(build_config(raw))
    path = tmp_path / "run" / "config.yaml"
    saved = yaml.safe_load(path.read_text())
    for edit in ({"options": {"r": 2}}, {"name": "moe_cl"}):
        path.write_text(yaml.safe_dump({**saved, "method": {**saved["method"], **edit}}))
        line = one_bounded_line(*run_cli(["eval", str(tmp_path / "run")]))
        assert "does not match" in line or "checkpoint" in line, line
    path.write_text("method: {name: [}\n")
    assert "config.yaml:1" in one_bounded_line(*run_cli(["eval", str(tmp_path / "run")]))


def test_jsonl_lines_end_at_newline_only(tmp_path, tiny_config):
    rows = [{"input": f"line\u2028with\u0085separators {i}", "output": "yes" if i % 2 else "no"} for i in range(6)]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                                 encoding="utf-8")
    from evolora.data import build_stream

    config = build_config(tiny_config(tmp_path, data={"stream": "custom", "tasks": [
        {"name": "t", "format": "jsonl", "path": str(tmp_path)}]}))
    task = build_stream(config.data)[0]
    assert sorted(e.input for e in task.test) == sorted(r["input"] for r in rows)


def test_a_full_disk_while_writing_the_report_is_one_line(tmp_path, tiny_config, monkeypatch):
    import errno

    from evolora import atomic

    run(build_config(tiny_config(tmp_path)))
    before = snapshot(tmp_path / "run")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "report.html"))

    monkeypatch.setattr(atomic, "write_text", full)
    line = one_bounded_line(*run_cli(["report", str(tmp_path / "run")]))
    assert "report.html" in line and "No space left on device" in line
    assert snapshot(tmp_path / "run") == before
