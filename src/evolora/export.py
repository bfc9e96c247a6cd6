"""`evolora export`: a finished run's model in the form the ecosystem loads.

- LoRA methods (seq_lora, replay, ewc, lwf, multitask, per_task_lora with a task, olora): a PEFT adapter folder
  (`adapter_config.json` + `adapter_model.safetensors`) that `PeftModel.from_pretrained(base, folder)` loads,
  with `base_model_name_or_path` set to the base model as a user would load it (an embedded model's hub id,
  else `model.name` as the config gave it). Where several adapters answer together (olora sums every task's),
  they are written as ONE adapter of their ranks concatenated, which is exact: Σ_i (α/r) B_i A_i =
  (nα / nr) [B_1 … B_n] [A_1; …; A_n].
- `--merge`: the adapter merged into the base weights, a plain Hugging Face model folder.
- seq_ft: the fine-tuned model, a plain Hugging Face model folder.
- moe_cl, cmoe: not exportable (the method's `export_note` says why); their run folder is the model.

The folder is written beside its destination and renamed into place; an existing non-empty destination is
never touched."""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from evolora import __version__
from evolora.errors import EvoloraError
from evolora.models import base_model_id, bf16_products, load_model, quiet_peft_wrapping
from evolora.reload import load_run

EXPORT_RECORD = "evolora_export.json"


def export_run(run_dir: Path, out: Path, stage: Optional[int] = None, task: Optional[str] = None,
               merge: bool = False, trust_remote_code: bool = False, allow_pickle: bool = False) -> dict:
    """Writes the export to `out` (which must not exist, or be an empty folder); returns what was written.
    `stage` is 1-based (default: the last); `task` names the task whose answer is exported."""
    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise EvoloraError(f"--out: {out} exists and is not an empty folder; export writes a new folder")
    index = None if stage is None else stage - 1
    ctx, method = load_run(run_dir, (), trust_remote_code, allow_pickle, stage=index)
    names = [t.name for t in ctx.tasks]
    if task is not None and task not in names:
        raise EvoloraError(f"--task: {task!r} is not a task of this run ({', '.join(names)})")
    task_index = None if task is None else names.index(task)
    form = method.export_form
    if form == "none":
        raise EvoloraError(f"{method.name} cannot be exported as a PEFT adapter or a plain model: {method.export_note}; "
                           "its run folder is the model (evolora eval / predict load it)")
    base_id = base_model_id(ctx.config.model)
    record = {"run": str(run_dir), "method": method.name, "stage": (index if index is not None else len(ctx.stages) - 1) + 1,
              "task": task, "base_model": base_id, "evolora": __version__}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with bf16_products(ctx.config.model):
            if form == "full":
                if merge:
                    raise EvoloraError(f"--merge: {method.name} trains the base weights; its export is already a "
                                       "plain model folder")
                ctx.model.save_pretrained(tmp)
                record["form"] = "model"
            else:
                adapters = method.export_adapters(task_index)
                rank = _write_adapter(ctx.model, adapters, base_id, tmp)
                record.update({"adapters": adapters, "rank": rank})
                record["form"] = "adapter"
                if merge:
                    _merge_into_base(ctx.config.model, tmp)
                    record["form"] = "merged"
            ctx.tokenizer.save_pretrained(tmp)
        (tmp / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record


def _write_adapter(model, adapters: list[str], base_id: str, folder: Path) -> int:
    """One PEFT adapter folder holding the sum of `adapters` (same rank and alpha each): ranks concatenated."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    if not isinstance(model, PeftModel):
        raise EvoloraError("export: this run's model holds no PEFT adapter")
    configs = [model.peft_config[name] for name in adapters]
    first = configs[0]
    if any((c.r, c.lora_alpha, c.use_rslora) != (first.r, first.lora_alpha, first.use_rslora) for c in configs) \
            or first.use_rslora or first.rank_pattern or first.alpha_pattern:
        raise EvoloraError("export: adapters of different ranks or scalings cannot be written as one adapter")
    parts = [get_peft_model_state_dict(model, adapter_name=name) for name in adapters]
    state = {}
    for key in parts[0]:
        tensors = [part[key].detach().float().cpu() for part in parts]
        if ".lora_A." in key:
            state[key] = torch.cat(tensors, dim=0).contiguous()
        elif ".lora_B." in key:
            state[key] = torch.cat(tensors, dim=1).contiguous()
        elif len(tensors) == 1:
            state[key] = tensors[0].contiguous()
        else:
            raise EvoloraError(f"export: {key} cannot be summed over adapters")
    config = copy.deepcopy(first)
    config.r, config.lora_alpha = first.r * len(adapters), first.lora_alpha * len(adapters)
    config.base_model_name_or_path = base_id
    config.inference_mode = True
    config.save_pretrained(str(folder))
    save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return config.r


def _merge_into_base(model_config, folder: Path) -> None:
    """Replaces the adapter in `folder` by a fresh base model with the adapter merged into its weights."""
    from peft import PeftModel

    base, _, _ = load_model(model_config)
    with quiet_peft_wrapping():
        merged = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (folder / name).unlink()
    merged.save_pretrained(folder)
