import pytest
import torch

from evolora.data.prompting import PromptBuilder
from evolora.data.tasks import Example, Task
from evolora.evaluation import evaluate_task, score_candidates
from evolora.models import tiny_llama


def naive_scores(model, prompts, candidates):
    out = torch.empty(len(prompts), len(candidates))
    for i, p in enumerate(prompts):
        for k, c in enumerate(candidates):
            ids = torch.tensor([p + c])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            out[i, k] = sum(logp[len(p) - 1 + t, c[t]] for t in range(len(c)))
    return out


def test_shared_prompt_scoring_equals_one_forward_per_label():
    model, tok = tiny_llama()
    model.eval()
    pb = PromptBuilder(tok, 64)
    task = Task("t", "Pick.\n", ["a", "bbb", "cc dd", "e"], [], [])
    prompts = [pb.encode_prompt(task, Example("x" * n, "a"), 0).input_ids for n in (1, 7, 3, 12, 5)]
    candidates = [pb.answer_ids(label) for label in task.labels]
    with torch.no_grad():
        fast = score_candidates(model, prompts, candidates, tok.pad_token_id, torch.device("cpu"), batch_size=2)
        slow = naive_scores(model, prompts, candidates)
    assert torch.allclose(fast, slow, atol=1e-4)


def test_single_token_candidates():
    model, tok = tiny_llama()
    model.eval()
    prompts = [[1, 50, 60], [1, 70]]
    candidates = [[80], [90], [100]]
    with torch.no_grad():
        fast = score_candidates(model, prompts, candidates, tok.pad_token_id, torch.device("cpu"))
        slow = naive_scores(model, prompts, candidates)
    assert torch.allclose(fast, slow, atol=1e-4)


def test_generate_mode_exact_match():
    model, tok = tiny_llama()
    model.eval()
    pb = PromptBuilder(tok, 64)
    task = Task("t", "", [], [], [Example("abc", "zz"), Example("d", "q")])
    result = evaluate_task(model, task, 0, pb, torch.device("cpu"), mode="generate", max_new_tokens=3)
    assert len(result.predictions) == 2
    assert result.accuracy == 100.0 * sum(p == ex.output for p, ex in zip(result.predictions, task.test)) / 2


def test_score_choices_equals_a_full_forward_of_prompt_and_choice():
    """Sharing the prompt's forward (its KV cache repeated per choice) gives each choice's summed
    log-likelihood exactly as one forward over prompt + choice does; prompts may hold different choices."""
    import torch

    from evolora.evaluation import score_choices
    from evolora.models import tiny_llama

    model, tok = tiny_llama()
    model.eval()
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    choices = [[[20, 21], [22], [23, 24, 25]], [[30], [31, 32], [33]], [[40, 41, 42, 43], [44], [45, 46]]]
    scored = score_choices(model, prompts, choices, tok.pad_token_id, torch.device("cpu"), batch_size=2)
    for prompt, options, (summed, lengths) in zip(prompts, choices, scored):
        for k, choice in enumerate(options):
            ids = torch.tensor([prompt + choice])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            expected = sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(choice))
            assert abs(summed[k].item() - expected) < 1e-4 and lengths[k].item() == len(choice)


def test_multiple_choice_rows_in_every_reader(tmp_path):
    import json

    from evolora.config import TaskSource
    from evolora.data.readers import read_choice_task, read_task
    from evolora.errors import DataError

    rows = [{"sentence": f"q{i}", "choices": ["a b", "c", "d e f"], "label": "c"} for i in range(4)]
    folder = tmp_path / "olora"
    folder.mkdir()
    for split in ("train", "test"):
        (folder / f"{split}.json").write_text(json.dumps(rows))
    (folder / "labels.json").write_text(json.dumps(["unused"]))
    task = read_task(TaskSource(name="mc", format="olora", path=str(folder)))
    assert task.test[0].choices == ("a b", "c", "d e f")
    jsonl = tmp_path / "jsonl"
    jsonl.mkdir()
    for split in ("train", "test"):
        (jsonl / f"{split}.jsonl").write_text("".join(json.dumps({"input": r["sentence"], "output": r["label"],
                                                                  "choices": r["choices"]}) + "\n" for r in rows))
    task = read_task(TaskSource(name="mc", format="jsonl", path=str(jsonl)))
    assert task.labels == [] and task.test[0].choices == ("a b", "c", "d e f")
    hf = tmp_path / "hf.jsonl"
    hf.write_text("".join(json.dumps({"text": r["sentence"], "label": r["label"], "options": r["choices"]}) + "\n"
                          for r in rows))
    task = read_task(TaskSource(name="mc", format="hf", dataset="json", data_files={"train": str(hf), "test": str(hf)},
                                choices_column="options", labels=["a b", "c", "d e f"]))
    assert task.test[0].choices == ("a b", "c", "d e f")
    assert len(read_choice_task(folder).test) == 4
    (folder / "test.json").write_text(json.dumps([{"sentence": "q", "choices": ["a", "b"], "label": "z"}]))
    import pytest

    with pytest.raises(DataError, match="test.json:1: the answer 'z' is not one of its 'choices'"):
        read_choice_task(folder)


def test_rouge_l_scores_generated_answers_and_becomes_the_figure_of_R(tmp_path, tiny_config):
    """eval.metric: rougeL: R holds the mean ROUGE-L F1 of the generated answers (0-100); exact match is still
    what the predictions file calls correct."""
    import json as _json

    from evolora.config import build_config
    from evolora.engine import run
    from evolora.evaluation import rouge_l

    assert rouge_l(["the cat sat", "nothing alike"], ["the cat sat", "a dog ran"]) == [1.0, 0.0]
    assert rouge_l(["the cat on the mat"], ["the cat sat on the mat"])[0] == pytest.approx(2 * 5 / 11)
    tasks = []
    for t in range(2):
        folder = tmp_path / f"gen{t}"
        folder.mkdir()
        for split in ("train", "test"):
            rows = [{"input": f"say word {i}", "output": f"word {i} and more words"} for i in range(4)]
            (folder / f"{split}.jsonl").write_text("".join(_json.dumps(r) + "\n" for r in rows))
        tasks.append({"name": f"gen{t}", "format": "jsonl", "path": str(folder)})
    raw = tiny_config(tmp_path, data={"stream": "custom", "tasks": tasks, "max_tasks": None},
                      eval={"mode": "generate", "max_new_tokens": 4, "metric": "rougeL", "zero_shot": False})
    record = run(build_config(raw), log=lambda _: None)
    rows = [_json.loads(x) for x in (tmp_path / "run" / "predictions" / "stage-02.jsonl").read_text().splitlines()]
    for j, name in enumerate(["gen0", "gen1"]):
        mine = [r for r in rows if r["task"] == name]
        expected = 100 * sum(rouge_l([r["prediction"] for r in mine], [r["gold"] for r in mine])) / len(mine)
        assert record["R"][-1][j] == pytest.approx(expected)
