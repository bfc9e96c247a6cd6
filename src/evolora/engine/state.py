"""What a run folder holds between crashes: a lock, the progress record, per-stage checkpoints and the
mid-stage step state, each file atomic and checksummed, so a resumed run continues exactly where the
last one stopped and a corrupt file is refused by name."""

from __future__ import annotations

import base64
import errno
import hashlib
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from evolora import atomic
from evolora.errors import EvoloraError
from evolora.runfolder import PROGRESS, STATE, read_json



def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def guarded_write(what: Path, write) -> None:
    """Runs an atomic write; a full disk or other OS error becomes one line naming the file, and the
    previous version of the file stays as it was."""
    try:
        write()
    except OSError as exc:
        reason = "no space left on device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise EvoloraError(f"{what}: could not be written ({reason}); the previous version is intact") from None


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    guarded_write(path, lambda: atomic.save_safetensors(path, tensors, metadata))
    return sha256_file(path)


def load_tensors(path: Path, sha256: Optional[str]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise EvoloraError(f"{path}: checkpoint missing")
    if sha256 and sha256_file(path) != sha256:
        raise EvoloraError(f"{path}: checkpoint is corrupt (checksum mismatch); it was not loaded")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise EvoloraError(f"{path}: checkpoint is corrupt or partial ({exc})") from None


def read_progress(run_dir: Path) -> Optional[dict]:
    path = Path(run_dir) / PROGRESS
    if not path.is_file():
        return None
    return read_json(path, "progress record")


def write_progress(run_dir: Path, progress: dict) -> None:
    path = Path(run_dir) / PROGRESS
    guarded_write(path, lambda: atomic.write_json(path, progress))


# --- random number generators ------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    """The states of the random number generators (torch's, CUDA's where present, Python's, NumPy's), JSON-able:
    kept in progress.json at every stage boundary, so a resumed run draws what the uninterrupted run drew."""
    py_state, np_state = random.getstate(), np.random.get_state()
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
             "python": [py_state[0], list(py_state[1]), py_state[2]],
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any], source: Path) -> None:
    try:
        torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, *rest = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
        cuda = state.get("cuda")
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
                                          for s in cuda])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise EvoloraError(f"{source}: its random number generator state is unreadable ({exc})") from None


# --- mid-stage step state ----------------------------------------------------------------------------

def step_state_paths(run_dir: Path) -> tuple[Path, Path]:
    return Path(run_dir) / STATE / "step.safetensors", Path(run_dir) / STATE / "step.json"


def save_step_state(run_dir: Path, stage: int, step: int, model: torch.nn.Module, optimizer, scheduler,
                    extra: dict[str, Any]) -> None:
    """Trainable weights, optimizer moments, scheduler and RNG states after `step` (0-based) of `stage`."""
    tensors = {f"param.{n}": p.detach() for n, p in model.named_parameters() if p.requires_grad}
    opt_state = optimizer.state_dict()
    for index, entry in opt_state["state"].items():
        for key, value in entry.items():
            tensors[f"optim.{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensor_path, json_path = step_state_paths(run_dir)
    digest = save_tensors(tensor_path, tensors, {"stage": str(stage), "step": str(step)})
    record = {
        "stage": stage, "step": step, "sha256": digest,
        "param_groups": opt_state["param_groups"],
        "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
        "rng": rng_state(),
        **extra,
    }
    guarded_write(json_path, lambda: atomic.write_json(json_path, record))


def read_step_state(run_dir: Path) -> Optional[dict]:
    _, json_path = step_state_paths(run_dir)
    if not json_path.is_file():
        return None
    return read_json(json_path, "step state")


def step_state_fits(record: dict, processes: int, partitioned: bool) -> bool:
    """Whether this launch can continue a saved step state: only one of as many processes (each process's share
    of the batches depends on their number) whose optimizer is whole (FSDP and ZeRO save none mid-stage, so a
    state was saved by a launch without them; a state of before the count was recorded is of one process)."""
    return not partitioned and record.get("processes", 1) == processes


def restore_step_state(run_dir: Path, record: dict, model: torch.nn.Module, optimizer, scheduler) -> None:
    tensor_path, _ = step_state_paths(run_dir)
    tensors = load_tensors(tensor_path, record["sha256"])
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            if key.startswith("param."):
                name = key[len("param."):]
                if name not in params:
                    raise EvoloraError(f"{tensor_path}: does not match this run's model ({name})")
                params[name].copy_(value)
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": record["param_groups"]})
    scheduler_state = dict(record["scheduler"])
    scheduler_state["lr_lambdas"] = [None] * len(scheduler_state.get("base_lrs", []))
    scheduler.load_state_dict(scheduler_state)
    rng = record.get("rng") or {  # a step state saved before the states were kept together
        "torch": base64.b64encode(tensors["rng.torch"].numpy().tobytes()).decode(),
        "python": record.get("rng_python"), "numpy": record.get("rng_numpy")}
    restore_rng_state(rng, tensor_path.with_suffix(".json"))


def clear_step_state(run_dir: Path) -> None:
    for path in step_state_paths(run_dir):
        path.unlink(missing_ok=True)
