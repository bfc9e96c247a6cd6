"""The README's code works as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_method_example_registers_and_runs(tmp_path, tiny_config):
    from evolora.config import build_config
    from evolora.engine import run
    from evolora.methods.registry import METHODS

    code = re.search(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S).group(1)
    try:
        exec(compile(code, "README.md", "exec"), {})
        raw = tiny_config(tmp_path, "l2_lora", method={"options": {"weight": 0.05}}, train={"log_every": 1})
        record = run(build_config(raw))
        assert record["complete"] and record["method"] == "l2_lora"
        logged = (tmp_path / "run" / "steps.jsonl").read_text()
        assert '"l2"' in logged
    finally:
        METHODS.pop("l2_lora", None)


def test_the_readme_starts_with_the_two_commands_and_stays_a_front_page():
    text = README.read_text(encoding="utf-8")
    assert text.startswith("```bash\nmake demo") and "\nmake test" in text.split("```")[1]
    assert len(text.splitlines()) <= 200
    assert "paper's form" not in text
