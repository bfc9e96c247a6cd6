import pytest

from evolora.config import build_config, load_config
from evolora.errors import ConfigError


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ntrain:\n  lr: 1.0e-4\n")
    cfg = load_config(path, ["train.lr=3e-4", "method.options.r=4", "data.stream=demo", "eval.mode=generate"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.method.options == {"r": 4}
    assert cfg.eval.mode == "generate"


def test_overrides_leave_the_given_dict_as_it_was():
    """A suite builds every run's config from one base dict: one run's `--set train.lr=...` must not reach the next."""
    base = {"name": "x", "train": {"lr": 1.0e-3}, "method": {"name": "seq_lora", "options": {"r": 8}}}
    first = build_config(base, ["train.lr=5e-5", "method.options.r=4", "method.name=ewc"])
    assert first.train.lr == pytest.approx(5e-5) and first.method.options == {"r": 4}
    assert base == {"name": "x", "train": {"lr": 1.0e-3}, "method": {"name": "seq_lora", "options": {"r": 8}}}
    assert build_config(base).train.lr == pytest.approx(1.0e-3)


@pytest.mark.parametrize("raw, expect", [
    ({"train": {"lr": "fast"}}, "train.lr: Input should be a valid number"),
    ({"train": {"batch_size": 0}}, "train.batch_size: Input should be greater than or equal to 1"),
    ({"eval": {"mode": "vibes"}}, "eval.mode: Input should be 'loglik' or 'generate'"),
    ({"trian": {}}, "trian: unknown field"),
    ({"data": {"stream": "mtl5", "order": 9}}, "data.order: stream mtl5 has orders 1..4"),
    ({"method": {"name": "nope"}}, "method.name: unknown method 'nope'"),
    ({"method": {"name": "seq_lora", "options": {"r": 0}}}, "method.options: r must be > 0"),
    ({"method": {"name": "seq_lora", "options": {"rank": 4}}}, "method.options.rank: unknown option"),
    ({"data": {"stream": "custom", "tasks": [{"name": "a", "format": "olora"}]}}, "format olora needs `path`"),
])
def test_bad_fields_give_one_line_naming_the_field(raw, expect):
    from evolora.methods import validate_method_options

    with pytest.raises(ConfigError) as err:  # method options are validated by the methods, not by config
        validate_method_options(build_config(raw, source="c.yaml").method, "c.yaml")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("c.yaml")
    assert expect in message


def test_yaml_errors_name_the_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ntrain:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match=r"c.yaml:\d+: invalid YAML"):
        load_config(path)
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        build_config({}, ["oops"])
