"""The CLI end to end on a tiny model: run, eval, report, and one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml


def evolora(*args, cwd=None):
    env = dict(os.environ, TQDM_DISABLE="1")
    return subprocess.run([sys.executable, "-m", "evolora", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def test_run_eval_report(tmp_path, tiny_config):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tmp_path)))
    result = evolora("run", config, "--set", "train.epochs=2")
    assert result.returncode == 0, result.stderr
    assert "Accuracy matrix R" in result.stdout and "AP " in result.stdout
    run_dir = tmp_path / "run"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["complete"] and metrics["stream"]["tasks"] == ["demo_object", "demo_place"]
    assert len(metrics["R"]) == 2 and all(v is not None for row in metrics["R"] for v in row)
    assert set(metrics["metrics"]) >= {"AP", "Avg", "BWT", "FWT", "forgetting"}
    assert metrics["parameters"]["added"] > 0
    assert metrics["parameters"]["added"] == metrics["parameters"]["trainable"]  # the adapter, not the base
    from safetensors.torch import load_file

    assert all("lora_" in key for key in load_file(run_dir / "checkpoints" / "stage-02.safetensors"))
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 2
    for name in ("report.html", "plots/R_heatmap.png", "plots/accuracy_over_time.png", "steps.jsonl",
                 "checkpoints/stage-01.safetensors", "checkpoints/stage-02.safetensors"):
        assert (run_dir / name).is_file(), name
    page = (run_dir / "report.html").read_text()
    assert "data:image/png;base64" in page and (run_dir / "plots" / "training_loss.png").is_file()
    # the report of record: definitions, n and an interval on AP, the environment, the resolved config
    assert "backward transfer" in page and "95 % bootstrap interval" in page and "n per task: demo_object 12" in page
    assert set(metrics["environment"]) >= {"evolora", "torch", "transformers", "peft", "machine"}
    assert f"transformers {metrics['environment']['transformers']}" in page
    assert "<h2>Config</h2><pre>name: tiny" in page and "epochs: 2" in page

    result = evolora("eval", run_dir)
    assert result.returncode == 0, result.stderr
    evaluated = json.loads((run_dir / "eval.json").read_text())
    assert [evaluated["accuracy"][t] for t in metrics["stream"]["tasks"]] == metrics["R"][-1]

    (run_dir / "report.html").unlink()
    assert evolora("report", run_dir).returncode == 0
    assert (run_dir / "report.html").is_file()

    # an existing run folder is never overwritten silently
    before = (run_dir / "metrics.json").read_bytes()
    result = evolora("run", config)
    assert result.returncode == 2 and "exists and is not empty" in result.stderr
    assert (run_dir / "metrics.json").read_bytes() == before


def test_errors_are_one_line_without_traceback(tmp_path, tiny_config):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tmp_path)))
    cases = [
        (["run", config, "--set", "train.lr=fast"], "train.lr"),
        (["run", tmp_path / "missing.yaml"], "config file not found"),
        (["run", config, "--set", "data.stream=custom", "--set",
          f"data.tasks=[{{name: a, format: olora, path: {tmp_path / 'nowhere'}}}]"], "task folder not found"),
        (["eval", tmp_path], "config.yaml: config file not found"),
        (["report", tmp_path], "metrics.json: not found"),
        (["bench", Path(__file__).parents[1] / "benchmarks" / "mtl5_cpu_suite.yaml", "--rerun"],
         "--rerun: name the runs to redo with --only"),
    ]
    for args, expect in cases:
        result = evolora(*args)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], result.stderr
        assert "Traceback" not in result.stderr


def test_version_and_the_choices_in_help():
    import re

    from typer.testing import CliRunner

    from evolora import __version__
    from evolora.cli import app
    from evolora.methods.build import _load_all
    from evolora.methods.registry import METHODS

    runner = CliRunner()
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"evolora {__version__}"
    text = re.sub(r"[\s│]+", " ", runner.invoke(app, ["demo", "--help"], terminal_width=200).output)
    _load_all()
    assert all(name in text for name in METHODS)
    text = re.sub(r"[\s│]+", " ", runner.invoke(app, ["eval", "--help"], terminal_width=200).output)
    assert "loglik | generate" in text and "oracle | locate" in text
