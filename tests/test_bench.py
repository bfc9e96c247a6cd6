"""`evolora bench` on two tiny tasks: runs, skips finished runs, writes the table and plots; `compare`."""

import json

import pytest
import yaml

from evolora.bench import all_result_files, run_suite
from evolora.report.compare import compare
from evolora.report.tables import results_markdown, write_results


def write_result(path, label, order=1, ap=50.0, suite="s", **fields):
    """A minimal results file of one bench run (one task) at `path`; `fields` add or replace top-level keys."""
    m = {"method": label.split("/")[0], "name": label, "metrics": {"AP": ap}, "R": [[ap]],
         "stream": {"name": "mtl5", "order": order, "tasks": ["a"]}, "model": "m", "parameters": {},
         "timings": {"total_s": 60.0}, "bench": {"suite": suite, "label": label}, **fields}
    path.write_text(json.dumps(m))
    return path


def test_suite_runs_skips_and_tabulates(tmp_path, tiny_config):
    base = tiny_config(tmp_path)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    suite = {"name": "tiny", "base": "base.yaml", "results": "results", "runs_dir": str(tmp_path / "runs"),
             "runs": [{"method": "seq_lora"}, {"method": "replay", "label": "replay small", "set": ["method.options.per_task=2"]}]}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    logs = []
    done = run_suite(tmp_path / "suite.yaml", log=logs.append)
    assert [p.name for p in done] == ["seq_lora.json", "replay_small.json"]
    again = []
    run_suite(tmp_path / "suite.yaml", log=again.append)
    assert sum("(skipped)" in line for line in again) == 2
    first_seq_lora = json.loads(done[0].read_text())
    redo = []
    run_suite(tmp_path / "suite.yaml", only=["seq_lora"], log=redo.append, rerun=True)
    assert any("running into" in line for line in redo) and not any("skipped" in line or "resum" in line for line in redo)
    assert json.loads(done[0].read_text())["timings"] != first_seq_lora["timings"]  # a new run, not the old file

    # each results file carries its final model's per-example correctness, as the run folder's predictions say
    kept = json.loads(done[1].read_text())["final_correct"]
    assert sorted(kept) == sorted(metrics_tasks := json.loads(done[1].read_text())["stream"]["tasks"])
    assert all(set(bits) <= {"0", "1"} for bits in kept.values())
    final = json.loads(done[1].read_text())["R"][-1]
    assert [100.0 * kept[t].count("1") / len(kept[t]) for t in metrics_tasks] == pytest.approx(final)
    table = write_results(all_result_files(tmp_path / "results", tmp_path / "suite.yaml"), tmp_path / "RESULTS.md").read_text()
    assert "| replay small (1 order) | " in table  # AP against seq_lora, paired
    lines = [x for x in table.splitlines() if x.startswith("|")]
    assert lines[0] == "| method | AP | Avg | BWT | FWT | drift | knowledge | locator | params/task | minutes |"
    assert lines[2].startswith("| seq_lora | ") and lines[3].startswith("| replay small | ")
    metrics = json.loads(done[0].read_text())
    assert f"| {metrics['metrics']['AP']:.1f} |" in lines[2]

    paths = compare([json.loads(p.read_text()) for p in done], tmp_path / "cmp")
    for path in paths.values():
        assert path.is_file() and path.stat().st_size > 0

    # `evolora compare` on the run folders: they kept their predictions, so AP is also compared paired
    from typer.testing import CliRunner

    from evolora.cli import app

    run_dirs = [tmp_path / "runs" / "tiny" / name for name in ("seq_lora", "replay_small")]
    result = CliRunner().invoke(app, ["compare", *map(str, run_dirs), "--out", str(tmp_path / "cmp2")])
    assert result.exit_code == 0, result.output
    assert "paired bootstrap" in result.output
    record = json.loads((tmp_path / "cmp2" / "comparison.json").read_text())
    delta = record[1]["metrics"]["AP"] - record[0]["metrics"]["AP"]
    assert record[1]["paired_vs_first"]["delta_AP"] == pytest.approx(delta)
    assert "paired_vs_first" not in record[0]
    # a run made before predictions were kept: a plain `evolora eval` of its final checkpoint stands in
    kept = record[1]["paired_vs_first"]
    for path in (run_dirs[1] / "predictions").glob("stage-*.jsonl"):
        path.unlink()
    assert CliRunner().invoke(app, ["eval", str(run_dirs[1])]).exit_code == 0
    result = CliRunner().invoke(app, ["compare", *map(str, run_dirs), "--out", str(tmp_path / "cmp3")])
    assert json.loads((tmp_path / "cmp3" / "comparison.json").read_text())[1]["paired_vs_first"] == kept


def test_orders_are_aggregated_as_mean_and_std(tmp_path):
    runs = []
    for order, ap, added in ((1, 50.0, 1000), (2, 60.0, 3000)):
        m = {"method": "seq_lora", "name": "x", "metrics": {"AP": ap, "BWT": -2.0}, "R": [[ap]],
             "stream": {"name": "mtl5", "order": order, "tasks": ["a"]}, "model": "m",
             "parameters": {"added_per_task": added},
             "timings": {"total_s": 60.0}, "bench": {"suite": "s", "label": "seq_lora"}}
        path = tmp_path / f"seq_lora-order{order}.json"
        path.write_text(json.dumps(m))
        runs.append(path)
    m = {"method": "seq_ft", "name": "y", "metrics": {"AP": 40.0}, "R": [[40.0]], "locate": {"AP": 39.0, "locator": 90.0},
         "stream": {"name": "mtl5", "order": 1, "tasks": ["a"]}, "model": "m", "parameters": {},
         "timings": {"total_s": 60.0}, "bench": {"suite": "s", "label": "seq_ft"}}
    (tmp_path / "seq_ft.json").write_text(json.dumps(m))
    table = results_markdown(runs + [tmp_path / "seq_ft.json"])
    assert "| seq_lora (2 orders) | 55.0 ± 7.1 |" in table
    from evolora.report.tables import _mean_std

    assert _mean_std([2.0e6, 4.0e6]) == "3.0e+06 ± 1.4e+06"  # a diverged run's drift in scientific notation
    # a method that sizes itself per order (CMoE) shows the mean of its parameters and their range
    assert "| 2,000 (1,000–3,000) | 1.0 ± 0.0 |" in table
    # beside means over orders, a single-order row says which order it is
    assert "| seq_ft (oracle, order 1 only) | 40.0 |" in table and "| seq_ft (locate, order 1 only) | 39.0 |" in table
    assert "| seq_ft (oracle) | 40.0 |" in results_markdown([tmp_path / "seq_ft.json"])


def test_rows_made_on_a_gpu_say_so_beside_their_minutes(tmp_path):
    cpu, gpu = "CPU x2 AVX512, 1 thread(s), x86_64, torch 2.13.0+cpu", "NVIDIA H100 80GB HBM3, x86_64, torch 2.11.0"
    bench = lambda label, machine: {"suite": "s", "label": label, "machine": machine}  # noqa: E731
    paths = [write_result(tmp_path / "a.json", "a", timings={"total_s": 120.0}, bench=bench("a", cpu)),
             write_result(tmp_path / "b.json", "b", timings={"total_s": 120.0}, bench=bench("b", gpu)),
             write_result(tmp_path / "c1.json", "c", order=1, bench=bench("c", gpu)),
             write_result(tmp_path / "c2.json", "c", order=2, bench=bench("c", cpu))]
    rows = {line.split(" | ")[0]: line for line in results_markdown(paths).splitlines() if line.startswith("| ")}
    assert rows["| a (order 1 only)"].endswith("| 2.0 |")
    assert rows["| b (order 1 only)"].endswith("| 2.0 GPU |")
    assert rows["| c (2 orders)"].endswith("| 1.0 ± 0.0 GPU and CPU |")  # a mean over both kinds measures neither


def test_every_shipped_suite_builds_a_valid_config_for_every_run():
    import json
    from pathlib import Path

    from evolora.bench import _base_for, load_suite
    from evolora.config import build_config, load_yaml

    suites = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*_suite.yaml"))
    assert len(suites) >= 2
    for path in suites:
        suite = load_suite(path)
        base = load_yaml(path.parent / suite.base)
        labels = [run.name for run in suite.runs]
        assert len(labels) == len(set(labels)), path
        for run in suite.runs:
            build_config(_base_for(base, run.method),
                         [f"method.name={run.method}", f"method.addons={json.dumps(run.addons)}", *run.set],
                         source=f"{path} [{run.name}]")


def test_an_interrupted_suite_run_is_resumed_and_expert_runs_get_oracle_and_locate_rows(tmp_path, tiny_config,
                                                                                       monkeypatch):
    import pytest

    import evolora.engine.runner as engine

    base = tiny_config(tmp_path, "moe_cl")
    base["method"]["options"] = {"locator_vae_steps": 10}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    suite = {"name": "tiny", "base": "base.yaml", "results": "results", "runs_dir": str(tmp_path / "runs"),
             "runs": [{"method": "moe_cl", "label": "moe_cl/memory=0", "set": ["method.options.memory_per_task=0"]}]}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    real_train = engine.train_stage

    def crash_in_second_stage(ctx, method, stage, *args, **kwargs):
        if stage == 1:
            raise RuntimeError("simulated crash")
        return real_train(ctx, method, stage, *args, **kwargs)

    monkeypatch.setattr(engine, "train_stage", crash_in_second_stage)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_suite(tmp_path / "suite.yaml", log=lambda _: None)
    monkeypatch.setattr(engine, "train_stage", real_train)
    logs = []
    done = run_suite(tmp_path / "suite.yaml", log=logs.append)
    assert any("resuming" in line for line in logs) and any("resumed after stage 1" in line for line in logs)
    assert done[0].name == "moe_cl_memory=0.json"
    kept = json.loads(done[0].read_text())
    located = kept["locate"]["final_correct"]  # the located predictions' correctness, beside the oracle one
    assert sorted(located) == sorted(kept["final_correct"]) == sorted(kept["stream"]["tasks"])
    assert [100.0 * located[t].count("1") / len(located[t]) for t in kept["stream"]["tasks"]] == \
        pytest.approx(kept["locate"]["R_final"])
    table = results_markdown(done)
    assert "| moe_cl/memory=0 (oracle) |" in table and "| moe_cl/memory=0 (locate) |" in table


def test_eval_precision_reproduces_the_runs_predictions_in_its_dtype_and_compares_fp32(tmp_path, tiny_config,
                                                                                      capsys, monkeypatch):
    import sys
    from pathlib import Path

    from evolora.config import build_config
    from evolora.engine import run

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import eval_precision

    raw = tiny_config(tmp_path, "moe_cl", model={"dtype": "bf16"}, train={"lr": 5e-2})
    run(build_config(raw))
    recorded = eval_precision.run_predictions(tmp_path / "run")
    dtype, accuracy, predictions = eval_precision.evaluate(tmp_path / "run", [], [])
    assert dtype == "bfloat16" and set(recorded) == set(accuracy) == set(predictions)
    for task, (run_predictions, gold) in recorded.items():
        assert predictions[task] == run_predictions  # same code, same dtype: the same answers
        assert accuracy[task] == 100.0 * sum(p == g for p, g in zip(run_predictions, gold)) / len(gold)
    monkeypatch.setattr(sys, "argv", ["eval_precision.py", str(tmp_path / "run"), "--tasks", next(iter(recorded))])
    eval_precision.main()
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert table[0].startswith("| task | examples | bfloat16 | fp32 |") and len(table) == 3
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    assert cells[0] == next(iter(recorded)) and cells[6] == "0"  # run vs re-evaluation in the run's dtype


def test_paired_intervals_against_the_references_pool_the_orders(tmp_path):
    """Rows get AP differences against seq_lora, replay and multitask with paired-bootstrap intervals, pooled over
    the orders both have; a single multitask run stands for every order; located rows are paired too."""
    import random

    from evolora.metrics import paired_ap_bootstrap

    rng = random.Random(0)
    bits = {}

    def result(label, order, accuracy, locate=None, per_order=True):
        correct = {t: "".join("1" if rng.random() < accuracy else "0" for _ in range(40)) for t in ("a", "b")}
        bits[(label, order)] = correct
        m = {"method": label, "name": label, "metrics": {"AP": 100 * accuracy}, "R": [[1.0, 1.0], [1.0, 1.0]],
             "stream": {"name": "mtl5", "order": order, "tasks": ["a", "b"]}, "model": "m", "parameters": {},
             "timings": {"total_s": 60.0}, "bench": {"suite": "s", "label": label, **({} if per_order else
                                                                                      {"per_order": False})},
             "final_correct": correct}
        if locate is not None:
            m["locate"] = {"AP": 100 * locate, "locator": 90.0,
                           "final_correct": {t: "".join("1" if rng.random() < locate else "0" for _ in range(40))
                                             for t in ("a", "b")}}
        path = tmp_path / f"{label}-{order}.json"
        path.write_text(json.dumps(m))
        return path

    files = [result("seq_lora", o, 0.5) for o in (1, 2)] + [result("multitask", 1, 0.8, per_order=False)] + \
        [result("moe_cl", o, 0.7, locate=0.6) for o in (1, 2)] + [result("replay", 1, 0.6)]
    table = results_markdown(files)
    assert "| method | vs seq_lora | vs replay | vs multitask |" in table
    paired = table[table.index("| method | vs seq_lora |"):]
    row = next(line for line in paired.splitlines() if line.startswith("| moe_cl (oracle, 2 orders) |"))
    pooled_ref = {f"{o}:{t}": [c == "1" for c in bits[("seq_lora", o)][t]] for o in (1, 2) for t in ("a", "b")}
    pooled_me = {f"{o}:{t}": [c == "1" for c in bits[("moe_cl", o)][t]] for o in (1, 2) for t in ("a", "b")}
    p = paired_ap_bootstrap(pooled_ref, pooled_me)
    assert row.split(" | ")[1] == f"{p['delta_AP']:+.1f} [{p['low']:+.1f}, {p['high']:+.1f}]"
    # replay ran on order 1 only and depends on the order: pooled over order 1 alone, which the cell names
    p = paired_ap_bootstrap({f"1:{t}": [c == "1" for c in bits[("replay", 1)][t]] for t in ("a", "b")},
                            {f"1:{t}": [c == "1" for c in bits[("moe_cl", 1)][t]] for t in ("a", "b")})
    assert row.split(" | ")[2] == f"{p['delta_AP']:+.1f} [{p['low']:+.1f}, {p['high']:+.1f}] (order 1)"
    # the one multitask run (per_order false) stands for both orders
    multi = {f"{o}:{t}": [c == "1" for c in bits[("multitask", 1)][t]] for o in (1, 2) for t in ("a", "b")}
    p = paired_ap_bootstrap(multi, pooled_me)
    assert row.split(" | ")[3].rstrip(" |") == f"{p['delta_AP']:+.1f} [{p['low']:+.1f}, {p['high']:+.1f}]"
    assert any(line.startswith("| moe_cl (locate, 2 orders) |") for line in table.splitlines())
    seq_row = [line for line in table.splitlines() if line.startswith("| seq_lora (2 orders) | ")][-1]
    assert seq_row.split(" | ")[1] == ""  # not against itself
    # and the multitask row stands for both orders of seq_lora too: the same pairs, the other way round
    multi_row = next(line for line in paired.splitlines() if line.startswith("| multitask (one run for every order) |"))
    pooled_seq = {f"{o}:{t}": [c == "1" for c in bits[("seq_lora", o)][t]] for o in (1, 2) for t in ("a", "b")}
    p = paired_ap_bootstrap(pooled_seq, multi)
    assert multi_row.split(" | ")[1] == f"{p['delta_AP']:+.1f} [{p['low']:+.1f}, {p['high']:+.1f}] (order 1, 2)"
    assert multi_row.split(" | ")[2].endswith("(order 1)")


def test_knowledge_differences_get_paired_intervals_where_runs_kept_each_question(tmp_path):
    """The general-knowledge probe's per-question correctness after the last stage gives each row a difference
    against the references with a paired-bootstrap interval, pooled over orders; a run without it gets no cell and
    no row, and the AP table is unchanged by it."""
    import random

    from evolora.metrics import paired_ap_bootstrap

    rng = random.Random(1)
    probe = {}

    def result(label, order, knows=None):
        bits = "".join("1" if rng.random() < (knows or 0) else "0" for _ in range(200))
        probe[(label, order)] = bits
        fields = {"knowledge": {"per_stage": [], **({"final_correct": {"wordnet_mc": bits}} if knows else {})}}
        return write_result(tmp_path / f"{label}-{order}.json", label, order, **fields)

    files = [result("seq_lora", o, 0.6) for o in (1, 2)] + [result("seq_lora+gere", o, 0.65) for o in (1, 2)] + \
        [result("replay", 1, 0.6), result("ewc", 1), result("seq_lora+gere", 3)]
    table = results_markdown(files)
    section = table[table.index("General knowledge after the last stage against seq_lora, replay"):]
    # seq_lora+gere's order 3 kept no per-question figures: the row says how many of its orders it pools
    row = next(line for line in section.splitlines() if line.startswith("| seq_lora+gere (2 of 3 orders) |"))
    p = paired_ap_bootstrap({f"{o}:wordnet_mc": [c == "1" for c in probe[("seq_lora", o)]] for o in (1, 2)},
                            {f"{o}:wordnet_mc": [c == "1" for c in probe[("seq_lora+gere", o)]] for o in (1, 2)})
    assert row.split(" | ")[1] == f"{p['delta_AP']:+.1f} [{p['low']:+.1f}, {p['high']:+.1f}]"
    assert row.split(" | ")[2].rstrip(" |").endswith("(order 1)")  # replay has order 1 only
    assert not any(line.startswith("| ewc") for line in section.splitlines())  # kept no per-question correctness
    assert "AP against" not in table  # these files kept no test-example correctness: no AP table


def test_backfill_knowledge_measures_again_and_writes_only_what_reproduces(tmp_path, tiny_config):
    """A results file made before the probe's per-question correctness was kept gets it from its run folder, the
    same bits the run itself kept; where the probe does not give the recorded accuracy, nothing is written."""
    from evolora.bench import backfill_knowledge

    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "test.json").write_text(json.dumps([
        {"sentence": f"The word {w} means:", "choices": ["a thing", "an act", "a place"], "label": "a thing"}
        for w in ("stone", "run", "city", "calm", "tree")]))
    base = tiny_config(tmp_path, data={"max_tasks": 1}, eval={"general_tasks": [str(probe)]})
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    suite = {"name": "s", "base": "base.yaml", "runs_dir": str(tmp_path / "runs"),
             "runs": [{"method": "seq_lora"}, {"method": "replay"}]}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    seq_lora, replay = run_suite(tmp_path / "suite.yaml", log=lambda _: None)
    kept = json.loads(seq_lora.read_text())["knowledge"]["final_correct"]
    for path, shift in ((seq_lora, 0.0), (replay, 1.0)):  # replay's file says another accuracy than its model gives
        metrics = json.loads(path.read_text())
        del metrics["knowledge"]["final_correct"]
        metrics["knowledge"]["per_stage"][-1]["mean"] += shift
        path.write_text(json.dumps(metrics))
    logs = []
    assert backfill_knowledge(tmp_path / "suite.yaml", log=logs.append) == [seq_lora]
    assert json.loads(seq_lora.read_text())["knowledge"]["final_correct"] == kept
    assert "final_correct" not in json.loads(replay.read_text())["knowledge"]
    assert any("(not written)" in line for line in logs)


def test_a_forty_run_comparison_stays_readable(tmp_path):
    """40 runs: the heatmaps in a grid of six columns (not one 13,000-px row), AP intervals on the bars where the
    runs kept their predictions, a distinct colour/style/marker per drift line."""
    import random

    from PIL import Image

    rng = random.Random(0)
    tasks = ["a", "b", "c"]
    runs, kept = [], []
    for i in range(40):
        R = [[rng.uniform(20, 90) for _ in tasks] for _ in tasks]
        runs.append({"name": f"r{i}", "method": "seq_lora", "metrics": {"AP": sum(R[-1]) / 3, "BWT": -1.0, "FWT": 1.0},
                     "R": R, "stream": {"name": "s", "order": 1, "tasks": tasks}, "model": "m", "parameters": {},
                     "timings": {"total_s": 60.0}, "bench": {"label": f"run_{i}"},
                     "general": {"perplexity": [10.0] * 4, "drift_pct_per_stage": [rng.uniform(-5, 5) for _ in tasks]}})
        kept.append({t: [rng.random() < 0.6 for _ in range(20)] for t in tasks} if i % 2 else None)
    paths = compare(runs, tmp_path / "cmp", kept)
    width, height = Image.open(paths["heatmaps"]).size
    assert width < 2200 and height < 2400
    import matplotlib.pyplot as plt

    styles = set()
    from evolora.report import compare as module

    real_plot = plt.Axes.plot

    def spy(self, *args, **kwargs):
        styles.add((kwargs.get("color"), kwargs.get("linestyle"), kwargs.get("marker")))
        return real_plot(self, *args, **kwargs)
    plt.Axes.plot = spy
    try:
        module._drift([(r["bench"]["label"], r["general"]) for r in runs], tmp_path / "drift.png")
    finally:
        plt.Axes.plot = real_plot
    assert len(styles) == 40


def test_a_suite_with_a_headline_splits_its_rows_and_says_where_options_were_chosen(tmp_path):
    from evolora.bench import Suite

    files = []
    for label, order in (("seq_lora", 1), ("seq_lora", 2), ("moe_cl/evolora", 1), ("moe_cl/lambda=0", 1)):
        files.append(write_result(tmp_path / f"{label.replace('/', '_')}-{order}.json", label, order))
    suite = Suite(name="s", base="b.yaml", headline=["seq_lora", "moe_cl/evolora", "cmoe"],
                  runs=[{"method": "seq_lora"}, {"method": "moe_cl", "label": "moe_cl/evolora", "chosen_on": "order 1 dev"},
                        {"method": "moe_cl", "label": "moe_cl/lambda=0"}, {"method": "cmoe"}])
    table = results_markdown(files, {"s": suite.table_layout()})
    headline, ablations = table.split("### Ablations (order 1)")
    assert "| seq_lora (2 orders) |" in headline and "| moe_cl/evolora (order 1 only) |" in headline
    assert "lambda=0" not in headline
    assert "Not run yet (headline methods without a results file): `cmoe`." in headline
    assert "| moe_cl/lambda=0 |" in ablations
    assert "- `moe_cl/evolora`: chosen on order 1 dev" in table


def test_each_ablation_is_compared_with_the_row_it_varies_on_the_orders_both_have(tmp_path):
    """An ablation row (label less its last `/` parts names a row) gets its AP and knowledge difference against
    that row with paired-bootstrap intervals on the shared orders; without per-question figures, no knowledge cell."""
    import random

    from evolora.bench import Suite
    from evolora.metrics import paired_ap_bootstrap

    rng = random.Random(2)
    kept = {}

    def result(label, order, accuracy, knows=None, per_order=True):
        test = {t: "".join("1" if rng.random() < accuracy else "0" for _ in range(30)) for t in ("a", "b")}
        probe = "".join("1" if rng.random() < (knows or 0) else "0" for _ in range(100))
        kept[(label, order)] = (test, probe)
        fields = {"final_correct": test, "knowledge": {"per_stage": [], **({"final_correct": {"wordnet_mc": probe}}
                                                                           if knows else {})}}
        if not per_order:
            fields["bench"] = {"suite": "s", "label": label, "per_order": False}
        return write_result(tmp_path / f"{label.replace('/', '_')}-{order}.json", label, order, **fields)

    files = [result("olora", o, 0.6, 0.6) for o in (1, 2)] + [result("olora/reference_lora", 1, 0.5, 0.55),
             result("moe_cl/evolora", 1, 0.7, 0.6), result("moe_cl/evolora/adversarial_weight=1", 1, 0.65),
             result("multitask", 1, 0.8, 0.6, per_order=False), result("multitask/seed=1", 1, 0.75, 0.6, per_order=False),
             result("other/x=1", 1, 0.5, 0.5)]
    suite = Suite(name="s", base="b.yaml", headline=["olora", "moe_cl/evolora", "multitask"],
                  runs=[{"method": "seq_lora", "label": label} for label in
                        ("olora", "olora/reference_lora", "moe_cl/evolora", "moe_cl/evolora/adversarial_weight=1",
                         "multitask", "multitask/seed=1", "other/x=1")])
    table = results_markdown(files, {"s": suite.table_layout()})
    section = table[table.index("| ablation | against | orders | AP | knowledge |"):].split("\n\n")[0].splitlines()

    def interval(a, b, part):
        p = paired_ap_bootstrap(*[{f"1:{t}": [c == "1" for c in v] for t, v in
                                   (kept[(x, 1)][0] if part == 0 else {"wordnet_mc": kept[(x, 1)][1]}).items()}
                                  for x in (a, b)])
        return f"{p['delta_AP']:+.1f} [{p['low']:+.1f}, {p['high']:+.1f}]"

    rows = {line.split(" | ")[0].lstrip("| "): line for line in section[2:]}
    assert rows["olora/reference_lora"] == (f"| olora/reference_lora | olora | 1 | {interval('olora', 'olora/reference_lora', 0)}"
                                            f" | {interval('olora', 'olora/reference_lora', 1)} |")
    assert rows["moe_cl/evolora/adversarial_weight=1"].endswith(
        f"| moe_cl/evolora | 1 | {interval('moe_cl/evolora', 'moe_cl/evolora/adversarial_weight=1', 0)} |  |")
    assert rows["multitask/seed=1"].startswith("| multitask/seed=1 | multitask | 1 | ")
    assert set(rows) == {"olora/reference_lora", "moe_cl/evolora/adversarial_weight=1", "multitask/seed=1"}


def test_a_suite_choice_is_decided_by_dev_ap_on_one_order_never_by_test(tmp_path):
    from evolora.bench import Suite

    files = []
    # b wins on dev (order 1) although a has the higher test AP there; c has no dev figures
    for label, order, dev, test in (("gere/w=1", 1, 60.0, 70.0), ("gere/w=0.5", 1, 62.0, 65.0),
                                    ("gere/w=1", 2, 50.0, 55.0), ("gere/w=0.5", 2, 40.0, 45.0), ("gere/kl", 1, None, 90.0)):
        files.append(write_result(tmp_path / f"{label.replace('/', '_')}-{order}.json", label, order, test,
                                  method="seq_lora", dev={"AP": dev} if dev is not None else None))
    suite = Suite(name="s", base="b.yaml", runs=[{"method": "seq_lora", "label": x} for x in
                                                 ("gere/w=1", "gere/w=0.5", "gere/kl", "gere/l1")],
                  choices=[{"choose": "GeRe weight", "candidates": ["gere/w=1", "gere/w=0.5"]},
                           {"choose": "GeRe loss", "candidates": ["gere/w=1", "gere/kl"]},
                           {"choose": "GeRe norm", "candidates": ["gere/w=1", "gere/l1"], "order": 1}])
    table = results_markdown(files, {"s": suite.table_layout()})
    assert "**GeRe weight**: chosen `gere/w=0.5` on order 1 dev." in table
    assert "| gere/w=0.5 (chosen) | 62.0 | 65.0 | 45.0 |" in table and "| gere/w=1 | 60.0 | 70.0 | 55.0 |" in table
    assert "- `gere/w=0.5`: chosen on order 1 dev (GeRe weight: 2 candidates)" in table
    # a suite's own note on a chosen label (what the choice did not cover) is kept beside the decision
    noted = Suite(**{**suite.model_dump(), "runs": [{"method": "seq_lora", "label": "gere/w=0.5", "chosen_on": "k on test"}]
                     + [{"method": "seq_lora", "label": x} for x in ("gere/w=1", "gere/kl", "gere/l1")]})
    assert "- `gere/w=0.5`: chosen on order 1 dev (GeRe weight: 2 candidates); k on test" in \
        results_markdown(files, {"s": noted.table_layout()})
    assert "**GeRe loss**: not decided yet: `gere/kl` has no dev figures on order 1" in table
    assert "**GeRe norm**: not decided yet: `gere/l1` is not run yet on order 1." in table


def test_a_suite_choice_naming_an_unknown_run_is_one_line(tmp_path):
    from evolora.bench import load_suite
    from evolora.errors import ConfigError

    path = tmp_path / "s.yaml"
    path.write_text("name: s\nbase: b.yaml\nruns: [{method: seq_lora}]\n"
                    "choices: [{choose: x, candidates: [seq_lora, replay]}]\n")
    with pytest.raises(ConfigError, match=r"choices.0.candidates: 'replay' is not the label of a run") as err:
        load_suite(path)
    assert "\n" not in str(err.value) and ": :" not in str(err.value)


def test_orders_reuse_the_base_orders_results_and_run_an_order_free_entry_once(tmp_path, tiny_config, monkeypatch):
    """`--orders 1,2`: a run made earlier without --orders on order 1 is that order's run; an entry with
    per_order false (joint training) runs once whatever the orders."""
    import evolora.bench as bench
    import evolora.engine as engine

    base = tiny_config(tmp_path, data={"stream": "mtl5", "order": 1})
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    suite = {"name": "s", "base": "base.yaml", "runs_dir": str(tmp_path / "runs"),
             "runs": [{"method": "seq_lora"}, {"method": "multitask", "per_order": False}]}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    calls = []

    def fake_run(config, run_dir, log, resume):
        calls.append((config.method.name, config.data.order))
        return {"method": config.method.name, "stream": {"name": "mtl5", "order": config.data.order, "tasks": []}}

    monkeypatch.setattr(engine, "run", fake_run)
    monkeypatch.setattr(bench, "add_final_correctness", lambda metrics, run_dir: None)
    folder = tmp_path / "results" / "s"
    folder.mkdir(parents=True)
    (folder / "seq_lora.json").write_text(json.dumps({"stream": {"order": 1}}))  # made before --orders
    done = run_suite(tmp_path / "suite.yaml", orders=[1, 2], log=lambda _: None)
    assert calls == [("multitask", 1), ("seq_lora", 2)]
    assert sorted(p.name for p in done) == ["multitask.json", "multitask.json", "seq_lora-order2.json", "seq_lora.json"]
    assert json.loads((folder / "multitask.json").read_text())["bench"]["per_order"] is False
    # made before the protocol's figures: --plan names it; --rerun --orders 1 replaces that same file
    from evolora.bench import stale_results

    assert stale_results(tmp_path / "suite.yaml", orders=[1, 2]) == [
        ("seq_lora", 1, ["per-example correctness", "knowledge"]),
        ("multitask", 1, ["per-example correctness", "knowledge"]), ("seq_lora", 2, ["per-example correctness", "knowledge"])]
    calls.clear()
    run_suite(tmp_path / "suite.yaml", only=["seq_lora"], orders=[1], log=lambda _: None, rerun=True)
    assert calls == [("seq_lora", 1)] and not (folder / "seq_lora-order1.json").exists()
    assert json.loads((folder / "seq_lora.json").read_text())["bench"]["label"] == "seq_lora"


def test_plan_lists_the_runs_still_to_make_with_known_minutes(tmp_path, tiny_config):
    from evolora.bench import plan_suite

    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_config(tmp_path, data={"stream": "mtl5", "order": 1})))
    suite = {"name": "s", "base": "base.yaml", "runs": [{"method": "seq_lora"}, {"method": "multitask", "per_order": False},
                                                        {"method": "replay"}, {"method": "seq_ft", "orders": [1]}]}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    folder = tmp_path / "results" / "s"
    folder.mkdir(parents=True)
    (folder / "seq_lora.json").write_text(json.dumps({"stream": {"order": 1}, "timings": {"total_s": 1500.0}}))
    (folder / "multitask.json").write_text(json.dumps({"stream": {"order": 1}, "timings": {"total_s": 600.0}}))
    todo = plan_suite(tmp_path / "suite.yaml", orders=[1, 2])
    assert todo == [("replay", 1, None, None, None), ("seq_ft", 1, None, None, None), ("seq_lora", 2, 25.0, None, None),
                    ("replay", 2, None, None, None)]
    assert len(list(folder.iterdir())) == 2  # nothing ran or was written


def test_plan_scales_minutes_from_a_suite_beside_it(tmp_path, tiny_config):
    """A label this suite has never run takes its minutes from a neighbouring suite that has, times the median
    ratio of the labels both have finished; a broken neighbour is passed over."""
    from evolora.bench import plan_suite

    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_config(tmp_path, data={"stream": "mtl5", "order": 1})))
    runs = [{"method": "seq_lora"}, {"method": "replay"}, {"method": "ewc"}, {"method": "lwf"}]
    for name in ("short", "long"):
        (tmp_path / f"{name}_suite.yaml").write_text(yaml.safe_dump({"name": name, "base": "base.yaml", "runs": runs}))
    (tmp_path / "broken_suite.yaml").write_text("name: [")

    def result(suite, stem, minutes):
        folder = tmp_path / "results" / suite
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{stem}.json").write_text(json.dumps({"stream": {"order": 1}, "timings": {"total_s": minutes * 60}}))

    for stem, minutes in (("seq_lora", 10), ("seq_lora-order2", 30), ("replay", 40), ("ewc", 50)):
        result("short", stem, minutes)
    result("long", "seq_lora", 40)  # 2x short's mean of 20
    result("long", "replay", 160)  # 4x short's 40: the median ratio is 3
    todo = plan_suite(tmp_path / "long_suite.yaml", orders=[1])
    assert todo == [("ewc", 1, 150.0, "short", (100.0, 200.0)), ("lwf", 1, None, None, None)]


def test_bench_headline_plan_from_the_command_line(tmp_path, tiny_config):
    from typer.testing import CliRunner

    from evolora.cli import app

    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_config(tmp_path, data={"stream": "mtl5", "order": 1})))
    suite = {"name": "s", "base": "base.yaml", "headline": ["seq_lora"],
             "runs": [{"method": "seq_lora"}, {"method": "replay"}]}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    result = CliRunner().invoke(app, ["bench", str(tmp_path / "suite.yaml"), "--headline", "--orders", "1,2", "--plan"])
    assert result.exit_code == 0, result.output
    assert "seq_lora  order 1  minutes unknown" in result.output and "replay" not in result.output
    assert "2 runs to make" in result.output and not (tmp_path / "results").exists()


def test_results_open_with_the_suite_of_lowest_position_and_older_folders_come_last(tmp_path):
    from evolora.bench import Suite

    files = [write_result(tmp_path / f"{suite}.json", "seq_lora", suite=suite) for suite in ("a_long", "z_record", "old")]
    layouts = {name: Suite(name=name, base="b.yaml", runs=[{"method": "seq_lora"}], **extra).table_layout()
               for name, extra in (("a_long", {}), ("z_record", {"position": 0}))}
    table = results_markdown(files, layouts)
    assert table.index("## z_record") < table.index("## a_long") < table.index("## old")
    assert "One task order so far (order 1): no mean or spread over orders yet." in table


def test_each_suite_gets_a_comparison_of_its_own_runs_named_by_order(tmp_path, tiny_config):
    from typer.testing import CliRunner

    from evolora.cli import app

    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_config(tmp_path, data={"stream": "mtl5", "order": 1})))
    for name in ("s", "t"):
        (tmp_path / f"{name}_suite.yaml").write_text(yaml.safe_dump({"name": name, "base": "base.yaml",
                                                                     "runs": [{"method": "seq_lora"}, {"method": "replay"}]}))
        (tmp_path / "results" / name).mkdir(parents=True)
    write_result(tmp_path / "results" / "t" / "replay-order4.json", "replay", order=4, ap=48.0, suite="t")
    write_result(tmp_path / "results" / "s" / "seq_lora-order1.json", "seq_lora", order=1, ap=51.0)
    write_result(tmp_path / "results" / "s" / "seq_lora-order2.json", "seq_lora", order=2, ap=52.0)
    write_result(tmp_path / "results" / "t" / "seq_lora-order4.json", "seq_lora", order=4, ap=44.0, suite="t")
    result = CliRunner().invoke(app, ["bench", str(tmp_path / "s_suite.yaml"), "--table-only",
                                      "--results-md", str(tmp_path / "RESULTS.md")])
    assert result.exit_code == 0, result.output
    s_rows = (tmp_path / "results" / "s" / "comparison" / "comparison.md").read_text().splitlines()[2:]
    assert [row.split(" | ")[:2] for row in s_rows] == [["| seq_lora (order 1)", "51.0"], ["| seq_lora (order 2)", "52.0"]]
    t_rows = (tmp_path / "results" / "t" / "comparison" / "comparison.md").read_text().splitlines()[2:]
    assert [row.split(" | ")[:2] for row in t_rows] == [["| seq_lora (order 4)", "44.0"], ["| replay (order 4)", "48.0"]]
    labels = [r["label"] for r in json.loads((tmp_path / "results" / "t" / "comparison" / "comparison.json").read_text())]
    assert labels == ["seq_lora (order 4)", "replay (order 4)"]
    # the other suite's rows in RESULTS.md follow its own run order too, not the files' names
    t_section = (tmp_path / "RESULTS.md").read_text().split("## t")[1]
    assert t_section.index("| seq_lora | 44.0") < t_section.index("| replay | 48.0")
