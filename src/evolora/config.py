"""Run configuration: YAML -> validated, typed config. `--set a.b=value` overrides any field."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evolora.errors import ConfigError, shown


PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]{0,127}$")


def check_name(value: str, field: str) -> str:
    """A name that becomes one path component: letters, digits and `_ . + = -`, not starting with a dot."""
    if not isinstance(value, str) or not PLAIN_NAME.match(value) or ".." in value:
        raise ValueError(f"{field}: {str(value)[:80]!r} is not a plain name (letters, digits, _ . + = -; it "
                         "becomes a folder name and may not hold a path)")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelConfig(_Strict):
    name: str = "smollm2-135m"
    """`smollm2-135m` (embedded), `tiny-llama` (random, for tests), a hub id or a local folder."""
    dtype: Literal["auto", "bf16", "fp32", "fp16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    chat_template: bool = False
    trust_remote_code: bool = False
    allow_pickle: bool = False
    """Load model weights from pickle (*.bin) files; off by default, since unpickling can run code."""
    quantization: Optional[Literal["nf4", "int8"]] = None
    """GPU only (bitsandbytes): the frozen base weights loaded 4-bit NF4 (QLoRA: compute in bf16) or 8-bit; for
    methods that train adapters only (seq_lora, replay, ewc, lwf, multitask, olora, per_task_lora)."""


class TaskSource(_Strict):
    """One task of a custom stream."""

    name: str
    format: Literal["olora", "jsonl", "trace", "hf"]
    path: Optional[str] = None
    """olora: a folder with train.json/test.json/labels.json; jsonl: a folder with train.jsonl/test.jsonl
    or the train file itself (test_path then names the test file); trace: a folder with train.json, eval.json
    (dev) and test.json of {"prompt", "answer"} rows (the TRACE benchmark's layout)."""
    test_path: Optional[str] = None
    input_field: str = "input"
    """jsonl/trace: the field holding a row's input (trace: `prompt` unless set)."""
    output_field: str = "output"
    """jsonl/trace: the field holding a row's answer (trace: `answer` unless set)."""
    instruction_field: str = "instruction"
    """jsonl/trace: the field holding a row's own instruction, when it has one."""
    instruction: Optional[str] = None
    labels: Optional[list[str]] = None
    # Hugging Face `datasets`
    dataset: Optional[str] = None
    """A hub name or a builder such as `json`/`csv` (then `data_files`)."""
    dataset_config: Optional[str] = None
    data_files: Optional[dict[str, str]] = None
    train_split: str = "train"
    test_split: str = "test"
    text_column: str = "text"
    label_column: str = "label"
    choices_column: Optional[str] = None
    """hf: a column listing each row's own answer options (multiple choice; the label is one of them)."""

    @model_validator(mode="after")
    def _needs_a_source(self):
        if self.format in ("olora", "jsonl", "trace") and not self.path:
            raise ValueError(f"task '{self.name}': format {self.format} needs `path`")
        if self.format == "hf" and not self.dataset:
            raise ValueError(f"task '{self.name}': format hf needs `dataset`")
        return self


class DataConfig(_Strict):
    stream: Literal["demo", "mtl5", "olora4", "long15", "custom"] = "demo"
    order: int = 1
    root: Optional[str] = None
    """Folder holding <task>/{train,test,labels}.json for the built-in benchmark streams."""
    tasks: list[TaskSource] = Field(default_factory=list)
    max_tasks: Optional[int] = Field(default=None, ge=1)
    """Keep only the first N tasks of the stream (quick trials)."""
    train_per_label: Optional[int] = Field(default=None, ge=1)
    test_per_label: Optional[int] = Field(default=None, ge=1)
    dev_per_label: int = Field(default=0, ge=0)
    max_input_tokens: int = Field(default=256, ge=8)
    seed: int = Field(default=0, ge=0, lt=2**32)

    @model_validator(mode="after")
    def _check_stream(self):
        orders = {"mtl5": (1, 4), "olora4": (1, 3), "long15": (4, 6)}
        if self.stream in orders:
            lo, hi = orders[self.stream]
            if not lo <= self.order <= hi:
                raise ValueError(f"data.order: stream {self.stream} has orders {lo}..{hi}, got {self.order}")
        if self.stream == "custom" and not self.tasks:
            raise ValueError("data.tasks: stream custom needs at least one task")
        return self


class MethodConfig(_Strict):
    name: str = "seq_lora"
    options: dict[str, Any] = Field(default_factory=dict)
    """Validated against the method's own options dataclass."""
    addons: dict[str, Optional[dict[str, Any]]] = Field(default_factory=dict)
    """Add-ons composed with the method, by name, each with its options: e.g. `{gere: {loss: tm}}`."""


class TrainConfig(_Strict):
    epochs: float = Field(default=1.0, gt=0, le=1000)
    batch_size: int = Field(default=8, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    lr: float = Field(default=2e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_ratio: float = Field(default=0.06, ge=0, le=1)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: Optional[float] = Field(default=1.0, gt=0)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """auto: autocast to the model's dtype when it is bf16/fp16 (trainable weights are kept in fp32)."""
    seed: int = Field(default=0, ge=0, lt=2**32)
    log_every: int = Field(default=10, ge=1)
    checkpoint_every: int = Field(default=100, ge=0)
    """Save the mid-stage step state (trainable weights, optimizer, scheduler, RNG) every N optimizer
    steps, so a crash loses at most N steps; 0 = only at the end of each stage."""
    fsdp: bool = False
    """With several processes: shard parameters, gradients and optimizer state over them (torch FSDP2), for a
    model that does not fit one device; methods whose parameters are fixed after setup (docs/scaling.md). A
    sharded run saves no mid-stage step state (a resume restarts the stage)."""


class EvalConfig(_Strict):
    mode: Literal["loglik", "generate"] = "loglik"
    batch_size: int = Field(default=16, ge=1)
    max_new_tokens: int = Field(default=16, ge=1)
    future_tasks: Literal["all", "next", "none"] = "all"
    """Which not-yet-trained tasks to evaluate after each task: `next` is enough for FWT."""
    zero_shot: bool = True
    task_id: Literal["oracle", "locate"] = "oracle"
    """How expert methods pick a task's experts at evaluation: given (`oracle`) or by their task locator."""
    locate_final: bool = True
    """With `oracle`, also evaluate the final model with located task ids when the method has a locator."""
    general_text: Optional[str] = None
    """JSONL of held-out general text (a `text` field per line): its perplexity is measured on the base model
    and after every stage, and reported as drift % (general-ability retention)."""
    general_texts: int = Field(default=200, ge=1)
    general_max_tokens: int = Field(default=256, ge=8)
    general_tasks: list[str] = Field(default_factory=list)
    """Multiple-choice task folders (test.json with `sentence`, `choices`, `label`), never trained on: their
    accuracy on the base model and after every stage is the `knowledge` figure (general-knowledge retention)."""
    knowledge_every_stage: bool = True
    """Measure `general_tasks` after every stage; false: on the base model and after the last stage only (the
    figure of record is the last stage's change; each pass of 1,000 questions costs minutes on a CPU)."""
    choice_norm: Literal["tokens", "none"] = "tokens"
    """Multiple choice: the summed log-likelihood of each choice divided by its token count (lm-eval's
    acc_norm, by tokens) or not (acc). Both are recorded; this one picks the prediction and the table's figure."""
    metric: Literal["exact", "rougeL"] = "exact"
    """How generated answers are scored (eval.mode generate, or a task with free-form answers): exact match, or
    ROUGE-L F1 (0-100; the rouge-score package). Label and multiple-choice scoring is unaffected."""
    cache: bool = True
    """Reuse a task's score from an earlier stage while the tensors that answer it are unchanged (methods that
    declare them: per_task_lora, moe_cl's task experts once frozen); R is the same with it on or off."""
    save_predictions: bool = True
    """Write every evaluated example's prediction to predictions/stage-NN.jsonl in the run folder (and
    predictions/final-located.jsonl for the located evaluation): for error analysis and paired comparisons."""


class OutputConfig(_Strict):
    dir: Optional[str] = None
    """Run folder; default runs/<name>."""
    overwrite: bool = False
    tensorboard: bool = True
    """TensorBoard in the run folder's tensorboard/ (skipped quietly when TensorBoard is not installed)."""
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(default_factory=list)
    """More experiment trackers (accelerate's): training scalars, per-stage accuracies (R), final metrics and the
    config as hyperparameters. W&B follows its environment (WANDB_MODE=offline: no network); MLflow logs to
    MLFLOW_TRACKING_URI, else an SQLite store in the run folder (mlflow.db, artifacts in mlruns/)."""
    keep_checkpoints: Literal["all", "last"] = "all"
    """Per-stage checkpoints of the learned tensors; `last` keeps disk use flat for full fine-tuning."""


class RunConfig(_Strict):
    name: str = "run"
    """A plain name (it names the default run folder runs/<name>)."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        return check_name(value, "name")

    def run_dir(self) -> Path:
        return Path(self.output.dir) if self.output.dir else Path("runs") / self.name


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    got = first.get("input")
    value = "" if first["type"] in ("extra_forbidden", "missing") or isinstance(got, dict) else f" (got {shown(got)})"
    more = f" [+{len(err.errors()) - 1} more]" if len(err.errors()) > 1 else ""
    return f"{source}: {field[:120]}: {msg[:200]}{value}{more}"


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {shown(text)}: expected KEY=VALUE, e.g. train.lr=2e-4")
    key, raw = text.split("=", 1)
    try:
        value = yaml.load(raw, Loader=UniqueKeyLoader) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    except RecursionError:
        raise ConfigError(f"--set {key[:80]}: value nested too deeply") from None
    return key.strip().split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for key in path[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {shown(item)}: {key[:80]} is not a section")
            node = child
        node[path[-1]] = value
    return raw


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a mapping with the same key twice (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: the base constructor reports it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {shown(key, 60)}",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ConfigError(f"{where}: invalid YAML ({problem[:200]})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw


def build_config(raw: dict, overrides: list[str] = (), source: str = "config") -> RunConfig:
    raw = apply_overrides(copy.deepcopy(raw), list(overrides))  # the caller's dict (a suite's base) stays as it was
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply") from None
    return config


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    return build_config(load_yaml(path), overrides, source=str(path))


def flatten(obj, prefix: str = "") -> dict:
    """Nested dicts (a dumped config) as one dict of dotted keys (`train.lr`) to their leaf values."""
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: obj}


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
