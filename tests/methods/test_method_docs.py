"""docs/methods/<method>.md states each design choice's default; the code must have that default, so the table
cannot drift from the code silently."""

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

DOCS = Path(__file__).resolve().parents[2] / "docs" / "methods"


def table_options(page: str, first: str, column: str) -> dict[str, dict]:
    """The table of docs/methods/<page> whose header starts with `first`: each row's first cell -> every
    `option: value` in its `column` cell."""
    lines = (DOCS / page).read_text(encoding="utf-8").splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith(f"| {first} |"))
    index = [c.strip() for c in lines[header].strip("|").split("|")].index(column)
    rows = {}
    for line in lines[header + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0].strip("`")] = {key: yaml.safe_load(value)
                                     for key, value in re.findall(r"`([a-z_][a-z0-9_]*): ([^`]+)`", cells[index])}
    return rows


def documented_defaults(name: str) -> dict:
    """Every `option: value` in the "evolora default" column of the doc's design table."""
    return {k: v for row in table_options(f"{name}.md", "choice", "evolora default").values() for k, v in row.items()}


def code_defaults(name: str) -> dict:
    from evolora.methods.build import method_class
    from evolora.methods.registry import ADDONS

    cls = ADDONS[name] if name == "gere" else method_class(name)
    options = cls.Options()
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}


@pytest.mark.parametrize("name, at_least", [("moe_cl", 12), ("gere", 6), ("cmoe", 5), ("olora", 6)])
def test_documented_defaults_are_the_codes(name, at_least):
    from evolora.methods.build import _load_all

    _load_all()
    documented, code = documented_defaults(name), code_defaults(name)
    assert len(documented) >= at_least
    for key, value in documented.items():
        assert key in code, f"docs/methods/{name}.md names `{key}`, which {name} does not have"
        assert code[key] == value, f"docs/methods/{name}.md: `{key}: {value}` but the code's default is {code[key]!r}"


def test_the_baselines_page_states_each_baselines_defaults():
    """docs/methods/baselines.md: one row per baseline; every `option: value` in its defaults cell is the code's."""
    from evolora.methods.build import _load_all

    _load_all()
    rows = table_options("baselines.md", "method", "evolora defaults")
    assert set(rows) == {"seq_ft", "seq_lora", "multitask", "replay", "ewc", "lwf", "per_task_lora"}
    for name, documented in rows.items():
        code = code_defaults(name)
        assert documented, f"docs/methods/baselines.md: the {name} row names no default"
        for key, value in documented.items():
            assert code.get(key) == value, f"docs/methods/baselines.md: {name} `{key}: {value}`, code {code.get(key)!r}"
