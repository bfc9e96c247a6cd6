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


SRC = Path(__file__).resolve().parents[1] / "src" / "evolora"


def test_the_engine_and_the_recipes_call_only_hooks_the_method_interface_declares():
    import ast

    from evolora.methods.base import Method

    declared = set(dir(Method)) | {"options", "base_parameter_ids"}
    files = [*sorted((SRC / "engine").glob("*.py")), SRC / "reload.py", SRC / "bench.py", SRC / "cli.py"]
    used = {(path.name, node.attr) for path in files for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "method"}
    assert {name for _, name in used} >= {"route", "has_locator", "locate", "refit"}
    undeclared = sorted((f, name) for f, name in used if name not in declared)
    assert undeclared == []
    # the engine reads no method option: what a method's options mean is the method's business
    options = [(path.name, node.lineno) for path in files for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.Attribute) and node.attr == "options" and isinstance(node.value, ast.Name)
               and node.value.id == "method"]
    assert options == []


def test_a_method_with_add_ons_answers_every_hook_as_its_method_does():
    """WithAddOns declares every hook: none falls back to the base class's default (which would, e.g., hide the
    wrapped method's task locator)."""
    from evolora.methods.addons import WithAddOns
    from evolora.methods.base import Method

    hooks = {name for name in vars(Method) if not name.startswith("_")} - {"name", "Options", "needs_hidden_states"}
    assert hooks - set(vars(WithAddOns)) == set()


def test_no_source_file_is_over_400_lines():
    sizes = {str(p.relative_to(SRC)): len(p.read_text().splitlines()) for p in SRC.rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 400} == {}


def test_the_tests_mirror_the_package():
    tests = Path(__file__).resolve().parent
    folders = sorted(p.name for p in tests.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    assert folders and all((SRC / name).is_dir() or (SRC / f"{name}.py").is_file() for name in folders)
