"""The package reads as the pipeline: no import loop, and every import points down (scripts/import_graph.py)."""

import importlib.util
from pathlib import Path


def load_script():
    path = Path(__file__).resolve().parents[1] / "scripts" / "import_graph.py"
    spec = importlib.util.spec_from_file_location("import_graph", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_import_loop_and_every_import_points_down_the_pipeline():
    graph = load_script()
    edges = graph.graph()
    assert "evolora.engine" in edges and "evolora.methods.moe_cl" in edges
    assert graph.loops(edges) == []
    assert graph.upward(edges) == []


def test_the_config_and_the_methods_import_nothing_above_them():
    edges = load_script().graph()
    assert edges["evolora.config"] <= {"evolora.errors"}
    assert not any(t.startswith("evolora.engine") for m, ts in edges.items() if m.startswith("evolora.methods")
                   for t in ts)
