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
