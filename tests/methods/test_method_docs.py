"""docs/methods/<method>.md states each design choice's default; the code must have that default, so the table
cannot drift from the code silently."""

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

DOCS = Path(__file__).resolve().parents[2] / "docs" / "methods"


def documented_defaults(name: str) -> dict:
    """Every `option: value` in the "evolora default" column of the doc's design table."""
    lines = (DOCS / f"{name}.md").read_text(encoding="utf-8").splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| choice |"))
    column = [c.strip() for c in lines[header].strip("|").split("|")].index("evolora default")
    found = {}
    for line in lines[header + 2:]:
        if not line.startswith("|"):
            break
        cell = [c.strip() for c in line.strip().strip("|").split("|")][column]
        for key, value in re.findall(r"`([a-z_][a-z0-9_]*): ([^`]+)`", cell):
            found[key] = yaml.safe_load(value)
    return found


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
    lines = (DOCS / "baselines.md").read_text(encoding="utf-8").splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| method |"))
    column = [c.strip() for c in lines[header].strip("|").split("|")].index("evolora defaults")
    rows = {}
    for line in lines[header + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0].strip("`")] = dict((k, yaml.safe_load(v)) for k, v in
                                         re.findall(r"`([a-z_][a-z0-9_]*): ([^`]+)`", cells[column]))
    assert set(rows) == {"seq_ft", "seq_lora", "multitask", "replay", "ewc", "lwf", "per_task_lora"}
    for name, documented in rows.items():
        code = code_defaults(name)
        assert documented, f"docs/methods/baselines.md: the {name} row names no default"
        for key, value in documented.items():
            assert code.get(key) == value, f"docs/methods/baselines.md: {name} `{key}: {value}`, code {code.get(key)!r}"
