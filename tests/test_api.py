"""docs/api.md's example runs as written, and the API module exports what the page lists."""

import re
from pathlib import Path

import pytest

API_DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_the_api_page_lists_every_function_of_evolora_api():
    import evolora.api as api

    text = API_DOC.read_text(encoding="utf-8")
    for name in api.__all__:
        if name != "Example":
            assert f"`{name}(" in text, name


@pytest.mark.slow
def test_the_api_example_runs(capsys):
    code = re.search(r"```python\n(.*?)```", API_DOC.read_text(encoding="utf-8"), re.S).group(1)
    exec(compile(code, "docs/api.md", "exec"), {})
    out = capsys.readouterr().out
    assert re.search(r"AP \d+\.\d BWT -?\d+\.\d", out) and "next token:" in out and "(gold:" in out
