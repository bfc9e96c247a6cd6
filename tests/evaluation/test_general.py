"""General-ability measurement: held-out perplexity on the base model and after every stage."""

import json
import math

import pytest
import torch

from evolora.config import build_config
from evolora.data.general import read_texts
from evolora.engine import run
from evolora.errors import DataError
from evolora.evaluation import perplexity
from evolora.models import load_model
from evolora.config import ModelConfig


def write_texts(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def test_read_texts_limit_and_errors(tmp_path):
    path = write_texts(tmp_path / "g.jsonl", ["one two", "  ", "three four", "five"])
    assert read_texts(path) == ["one two", "three four", "five"]
    assert read_texts(path, limit=2) == ["one two", "three four"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"title": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:2: missing key 'text'"):
        read_texts(bad)
    with pytest.raises(DataError, match="not found"):
        read_texts(tmp_path / "missing.jsonl")


def test_perplexity_matches_direct_computation_and_ignores_padding():
    model, tokenizer, device = load_model(ModelConfig(name="tiny-llama", dtype="fp32"))
    seqs = [[5, 9, 13, 20, 7], [8, 3], [11, 12, 13]]
    got = perplexity(model, seqs, tokenizer.pad_token_id, device, batch_size=3)
    nll, n = 0.0, 0
    with torch.no_grad():
        for s in seqs:  # one unpadded sequence at a time
            logits = model(input_ids=torch.tensor([s], device=device)).logits[0, :-1]
            nll += torch.nn.functional.cross_entropy(logits, torch.tensor(s[1:], device=device), reduction="sum").item()
            n += len(s) - 1
    assert got.tokens == n
    assert got.value == pytest.approx(math.exp(nll / n), rel=1e-4)


def test_run_reports_general_drift(tmp_path, tiny_config):
    texts = write_texts(tmp_path / "heldout.jsonl", [f"text number {i} about things and more things" for i in range(6)])
    raw = tiny_config(tmp_path, "seq_ft", eval={"general_text": str(texts), "general_texts": 4})
    record = run(build_config(raw))
    ppl = record["general"]["perplexity"]
    assert len(ppl) == 1 + len(record["R"]) and all(p > 1 for p in ppl)
    assert record["metrics"]["drift_pct"] == pytest.approx(100 * (ppl[-1] / ppl[0] - 1))
    assert "General ability" in (tmp_path / "run" / "report.html").read_text(encoding="utf-8")


def test_general_knowledge_is_measured_on_the_base_model_and_after_every_stage(tmp_path, tiny_config):
    import json

    from evolora.report.tables import results_markdown
    from evolora.config import build_config
    from evolora.engine import run

    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "test.json").write_text(json.dumps([
        {"sentence": f"The word {w} means:", "choices": ["a thing", "an act", "a place", "a state"], "label": "a thing"}
        for w in ("stone", "run", "city", "calm", "tree")]))
    raw = tiny_config(tmp_path, eval={"batch_size": 8, "general_tasks": [str(probe)]})
    record = run(build_config(raw))
    per_stage = record["knowledge"]["per_stage"]
    assert len(per_stage) == 1 + len(record["R"])  # the base model, then every stage
    assert all(k["tasks"]["probe"]["n"] == 5 for k in per_stage)
    assert record["knowledge"]["norm"] == "tokens"
    assert record["metrics"]["knowledge_pts"] == per_stage[-1]["mean"] - per_stage[0]["mean"]
    # each question's correctness after the last stage (by the table's normalisation), for paired intervals
    bits = record["knowledge"]["final_correct"]["probe"]
    assert len(bits) == 5 and set(bits) <= {"0", "1"}
    assert 100.0 * bits.count("1") / 5 == pytest.approx(per_stage[-1]["tasks"]["probe"]["acc_norm"])
    assert not any("correct" in k for k in per_stage)
    path = tmp_path / "m.json"
    path.write_text(json.dumps({**record, "bench": {"label": "x", "suite": "s"}}))
    row = next(line for line in results_markdown([path]).splitlines() if line.startswith("| x |"))
    assert row.split(" | ")[6] == f"{record['metrics']['knowledge_pts']:.1f}"


def test_base_model_figures_are_measured_once_and_shared_until_an_input_changes(tmp_path, tiny_config, monkeypatch):
    """The base model's perplexity and knowledge are the same for every run of a suite: measured once and read
    from the cache after, until the text, the probe or an answering setting changes."""
    import evolora.engine.scoring as scoring

    monkeypatch.setenv("EVOLORA_CACHE", str(tmp_path / "cache"))
    texts = write_texts(tmp_path / "heldout.jsonl", [f"text number {i} about things" for i in range(4)])
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "test.json").write_text(json.dumps([
        {"sentence": f"The word {w} means:", "choices": ["a thing", "an act"], "label": "a thing"} for w in ("stone", "run")]))
    base_calls = []
    for name in ("general_perplexity", "general_knowledge"):
        real = getattr(scoring, name)

        def counting(ctx, method, route_task, real=real, name=name):
            if route_task is None:
                base_calls.append(name)
            return real(ctx, method, route_task)
        monkeypatch.setattr(scoring, name, counting)

    def one_run(folder, method="seq_lora"):
        raw = tiny_config(tmp_path / folder, method, data={"max_tasks": 1},
                          eval={"general_text": str(texts), "general_texts": 4, "general_tasks": [str(probe)]})
        return run(build_config(raw), log=lambda _: None)

    first = one_run("a")
    assert sorted(base_calls) == ["general_knowledge", "general_perplexity"]
    second = one_run("b", "replay")
    assert sorted(base_calls) == ["general_knowledge", "general_perplexity"]  # read from the cache
    assert second["general"]["perplexity"][0] == first["general"]["perplexity"][0]
    assert second["knowledge"]["per_stage"][0] == first["knowledge"]["per_stage"][0]
    write_texts(texts, [f"other text {i}" for i in range(4)])
    one_run("c")
    assert base_calls.count("general_perplexity") == 2 and base_calls.count("general_knowledge") == 1
