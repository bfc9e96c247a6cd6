import json

import pytest

from evolora.config import DataConfig, TaskSource
from evolora.data import build_stream
from evolora.data.readers import read_olora_task, read_task
from evolora.data.tasks import select_per_label
from evolora.errors import DataError

from conftest import shared_data_or_skip


def write_olora(folder, train, test, labels):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.json").write_text(json.dumps(train, indent=1))
    (folder / "test.json").write_text(json.dumps(test, indent=1))
    (folder / "labels.json").write_text(json.dumps(labels))
    return folder


ROWS = [{"sentence": f"text {i}", "label": "pos" if i % 2 else "neg"} for i in range(20)]


def test_olora_task_roundtrip(tmp_path):
    folder = write_olora(tmp_path / "sst", ROWS, ROWS[:6], ["neg", "pos"])
    task = read_olora_task("sst", folder, "Sentiment?\n")
    assert task.labels == ["neg", "pos"]
    assert len(task.train) == 20 and len(task.test) == 6
    assert task.train[3].input == "text 3" and task.train[3].output == "pos"


def test_unknown_label_names_file_line_and_label(tmp_path):
    rows = ROWS[:3] + [{"sentence": "x", "label": "meh"}]
    folder = write_olora(tmp_path / "t", rows, ROWS[:2], ["neg", "pos"])
    with pytest.raises(DataError) as err:
        read_olora_task("t", folder, "")
    message = str(err.value)
    assert f"{folder / 'train.json'}:" in message and "'meh'" in message
    line = int(message.split(":")[1])
    assert (folder / "train.json").read_text().splitlines()[line - 1].strip().startswith("{")
    assert "meh" in "\n".join((folder / "train.json").read_text().splitlines()[line - 1:line + 3])


@pytest.mark.parametrize("content, expect", [
    ('[{"sentence": "a", "label": "pos"},\n {"sentence": "b"}]', ":2: missing key 'label'"),
    ('[{"sentence": "a", "label": "pos"},\n {"sentence": 3, "label": "pos"}]', ":2: 'sentence' must be a string"),
    ('[{"sentence": "a", "label": "pos"},\n {"sentence": "b", "label": "pos"', ":2: invalid JSON"),
    ('{"sentence": "a"}', ":1: expected a JSON list"),
    ('[{"sentence": "a", "label": "pos"}\n {"sentence": "b", "label": "pos"}]', ":2: expected ',' or ']'"),
    ('[\n"just a string"]', ":2: expected a JSON object"),
])
def test_malformed_rows(tmp_path, content, expect):
    folder = write_olora(tmp_path / "t", ROWS, ROWS, ["neg", "pos"])
    (folder / "train.json").write_text(content)
    with pytest.raises(DataError, match=f"train.json{expect}"):
        read_olora_task("t", folder, "")


def test_bad_encoding_and_missing_files(tmp_path):
    folder = write_olora(tmp_path / "t", ROWS, ROWS, ["neg", "pos"])
    (folder / "test.json").write_bytes(b'[\n{"sentence": "caf\xe9", "label": "pos"}]')
    with pytest.raises(DataError, match=r"test.json:2: not valid UTF-8"):
        read_olora_task("t", folder, "")
    with pytest.raises(DataError, match="task folder not found"):
        read_olora_task("t", tmp_path / "nope", "")
    (folder / "labels.json").unlink()
    with pytest.raises(DataError, match="labels.json: file not found"):
        read_olora_task("t", folder, "")


def test_empty_task_is_refused(tmp_path):
    folder = write_olora(tmp_path / "t", [], ROWS, ["neg", "pos"])
    with pytest.raises(DataError, match="no training examples"):
        read_olora_task("t", folder, "")


def test_jsonl_task_with_inferred_labels_and_row_instruction(tmp_path):
    train = [{"input": f"q{i}", "output": "yes" if i % 3 else "no", "instruction": "Answer:"} for i in range(9)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in train) + "\n")
    (tmp_path / "test.jsonl").write_text(json.dumps({"input": "q", "output": "no"}) + "\n")
    task = read_task(TaskSource(name="qa", format="jsonl", path=str(tmp_path)))
    assert task.labels == ["no", "yes"]
    assert task.train[0].instruction == "Answer:" and task.test[0].instruction is None


def test_jsonl_bad_line(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"input": "a", "output": "b"}\n\n{"input": "a"\n')
    (tmp_path / "test.jsonl").write_text('{"input": "a", "output": "b"}\n')
    with pytest.raises(DataError, match=r"train.jsonl:3: invalid JSON"):
        read_task(TaskSource(name="qa", format="jsonl", path=str(tmp_path)))
    (tmp_path / "train.jsonl").write_text('{"input": "a", "output": "c"}\n')
    with pytest.raises(DataError, match=r"train.jsonl:1: label 'c' is not in"):
        read_task(TaskSource(name="qa", format="jsonl", path=str(tmp_path), labels=["b"]))


def test_hf_datasets_reader_with_local_files(tmp_path):
    rows = [{"text": f"t{i}", "label": i % 3} for i in range(12)]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    source = TaskSource(name="topics", format="hf", dataset="json",
                        data_files={"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")},
                        labels=["a", "b", "c"])
    task = read_task(source)
    assert task.labels == ["a", "b", "c"]
    assert [ex.output for ex in task.train[:4]] == ["a", "b", "c", "a"]
    with pytest.raises(DataError, match="column 'sentence' not in json"):
        read_task(source.model_copy(update={"text_column": "sentence"}))


def test_hf_reader_uses_classlabel_names(tmp_path):
    import datasets

    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    ds = datasets.Dataset.from_dict({"text": ["bad", "good", "ok"], "label": [0, 1, 1]}, features=features)
    ds.to_parquet(str(tmp_path / "train.parquet"))
    ds.to_parquet(str(tmp_path / "test.parquet"))
    # parquet keeps the ClassLabel feature in its schema metadata
    task = read_task(TaskSource(name="s", format="hf", dataset="parquet",
                                data_files={"train": str(tmp_path / "train.parquet"),
                                            "test": str(tmp_path / "test.parquet")}))
    assert task.labels == ["neg", "pos"] and task.train[1].output == "pos"


def test_per_label_selection_carves_dev_from_train_only(tmp_path):
    folder = write_olora(tmp_path / "t", ROWS, ROWS[:10], ["neg", "pos"])
    task = read_olora_task("t", folder, "")
    picked = select_per_label(task, train_per_label=3, test_per_label=2, dev_per_label=2, seed=0)
    assert len(picked.train) == 6 and len(picked.dev) == 4 and len(picked.test) == 4
    assert not set(map(id, picked.dev)) & set(map(id, picked.test))
    assert set(picked.dev) <= set(task.train) and not set(picked.dev) & set(picked.train)
    again = select_per_label(task, 3, 2, 2, seed=0)
    assert again.train == picked.train and again.test == picked.test
    assert select_per_label(task, 3, 2, 2, seed=1).train != picked.train
    # a dev split never changes the training subsample: a label whose pool holds little gives dev what is left
    assert select_per_label(task, 3, 2, 0, seed=0).train == picked.train
    per_label = min(sum(e.output == label for e in task.train) for label in ("neg", "pos"))
    short = select_per_label(task, per_label - 1, 2, 5, seed=0)
    assert short.train == select_per_label(task, per_label - 1, 2, 0, seed=0).train and len(short.dev) == 2


def test_builtin_stream_from_shared_benchmark():
    data = shared_data_or_skip()
    config = DataConfig(stream="mtl5", order=1, root=str(data / "cl_benchmark" / "full"),
                        train_per_label=2, test_per_label=1)
    tasks = build_stream(config)
    assert [t.name for t in tasks] == ["yelp", "agnews", "dbpedia", "amazon", "yahoo"]
    assert tasks[1].instruction.startswith("What is the topic")
    assert len(tasks[2].train) == 14 * 2 and len(tasks[2].test) == 14


def test_builtin_stream_needs_root(monkeypatch):
    monkeypatch.delenv("EVOLORA_DATA_ROOT", raising=False)
    with pytest.raises(DataError, match="data.root"):
        build_stream(DataConfig(stream="mtl5"))


def test_demo_stream_is_deterministic_and_balanced():
    a = build_stream(DataConfig(stream="demo"))
    b = build_stream(DataConfig(stream="demo"))
    assert [t.train for t in a] == [t.train for t in b]
    assert len(a) == 3
    for task in a:
        counts = {label: sum(ex.output == label for ex in task.test) for label in task.labels}
        assert len(set(counts.values())) == 1
        assert not {ex.input for ex in task.train} & {ex.input for ex in task.test}


def test_trace_layout_reads_prompt_answer_with_eval_as_dev(tmp_path):
    import json as _json

    for split, n in (("train", 3), ("eval", 2), ("test", 2)):
        (tmp_path / f"{split}.json").write_text(_json.dumps(
            [{"prompt": f"Summarise: text {split} {i}", "answer": f"summary {i} of {split}"} for i in range(n)]))
    task = read_task(TaskSource(name="meetingbank", format="trace", path=str(tmp_path)))
    assert [len(task.train), len(task.dev), len(task.test)] == [3, 2, 2]
    assert task.train[0].input == "Summarise: text train 0" and task.train[0].output == "summary 0 of train"
    (tmp_path / "test.json").write_text('[{"prompt": "x", "answer": "y"},\n {"prompt": "x"}]')
    with pytest.raises(DataError, match=r"test.json:2: .*'answer'"):
        read_task(TaskSource(name="meetingbank", format="trace", path=str(tmp_path)))
    (tmp_path / "train.json").unlink()
    with pytest.raises(DataError, match=r"train.json: not found \(a TRACE task folder"):
        read_task(TaskSource(name="meetingbank", format="trace", path=str(tmp_path)))


def test_jsonl_field_mapping_reads_other_field_names(tmp_path):
    rows = [{"query": f"What is {i}+{i}?", "response": str(2 * i), "system": "Add."} for i in range(3)]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = read_task(TaskSource(name="add", format="jsonl", path=str(tmp_path), input_field="query",
                                output_field="response", instruction_field="system"))
    assert task.test[1].input == "What is 1+1?" and task.test[1].output == "2" and task.test[1].instruction == "Add."
    with pytest.raises(DataError, match=r"train.jsonl:1: .*'input'"):
        read_task(TaskSource(name="add", format="jsonl", path=str(tmp_path)))
