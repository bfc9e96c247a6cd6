import torch

from evolora.data.batching import collate_train, left_pad, length_grouped_batches
from evolora.data.prompting import IGNORE, PromptBuilder
from evolora.data.tasks import Example, Task
from evolora.models import answer_loss
from evolora.models import tiny_llama

TASK = Task("t", "Classify.\n", ["pos", "neg"], [], [])


def builder(max_input_tokens=64):
    _, tok = tiny_llama()
    return PromptBuilder(tok, max_input_tokens), tok


def test_prompt_format_and_answer_targets():
    pb, tok = builder()
    enc = pb.encode_train(TASK, Example("good film", "pos"), 0)
    text = tok.decode(enc.input_ids)
    assert text == "Classify.\nOption: pos, neg \ngood film\nAnswer: pos"
    assert enc.input_ids[-1] == tok.eos_token_id
    assert tok.decode(enc.input_ids[enc.prompt_len:]) == " pos"


def test_input_is_truncated_never_instruction_or_answer():
    pb, tok = builder(max_input_tokens=5)
    enc = pb.encode_train(TASK, Example("a very long review " * 20, "neg"), 0)
    text = tok.decode(enc.input_ids)
    assert text.startswith("Classify.\nOption: pos, neg \na ver\nAnswer:")
    assert text.endswith("Answer: neg")


def test_loss_covers_answer_and_eos_only():
    pb, tok = builder()
    items = [pb.encode_train(TASK, Example("x" * n, lab), 0) for n, lab in ((3, "pos"), (12, "neg"))]
    batch = collate_train(items, tok.pad_token_id)
    assert batch.labels.shape == (2, len(" pos") + 1)
    for row, item in enumerate(items):
        width = batch.input_ids.shape[1]
        start = width - (len(item.input_ids) - item.prompt_len)
        assert batch.input_ids[row, start:].tolist() == item.input_ids[item.prompt_len:]
        targets = batch.labels[row][batch.labels[row] != IGNORE].tolist()
        assert targets == item.input_ids[item.prompt_len:]
    # left padding: the first real token of every row is at position 0
    assert (batch.position_ids[batch.attention_mask.bool()].min() == 0)
    assert batch.position_ids[0, -1] == len(items[0].input_ids) - 1


def test_answer_loss_matches_full_sequence_loss():
    model, tok = tiny_llama()
    pb = PromptBuilder(tok, 64)
    items = [pb.encode_train(TASK, Example("x" * n, lab), 0) for n, lab in ((3, "pos"), (9, "neg"), (5, "pos"))]
    batch = collate_train(items, tok.pad_token_id)
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                logits_to_keep=batch.labels.shape[1] + 1)
    fast = answer_loss(out.logits, batch.labels)
    # reference: each sequence alone, no padding, loss on the answer tokens
    total, count = 0.0, 0
    for it in items:
        ids = torch.tensor([it.input_ids])
        logits = model(input_ids=ids).logits[0, :-1]
        targets = torch.tensor(it.input_ids[1:])
        mask = torch.arange(1, len(it.input_ids)) >= it.prompt_len
        total += torch.nn.functional.cross_entropy(logits[mask], targets[mask], reduction="sum").item()
        count += int(mask.sum())
    assert torch.isclose(fast, torch.tensor(total / count), atol=1e-4)


def test_length_grouped_batches_cover_everything_once():
    pb, _ = builder()
    items = [pb.encode_train(TASK, Example("x" * n, "pos"), 0) for n in range(37)]
    batches = length_grouped_batches(items, 4, seed=0, pool=2)
    flat = [it for b in batches for it in b]
    assert sorted(map(id, flat)) == sorted(map(id, items))
    assert batches == length_grouped_batches(items, 4, seed=0, pool=2)


def test_left_pad():
    ids, mask, pos = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]
