"""Loading a local Transformers causal LM and its tokenizer, offline, with clear errors.

Nothing here reaches a model hub: every call passes `local_files_only=True`. A folder that ships its
own modeling code (`auto_map` in config.json) loads only when the config says `trust_remote_code:
true`; code from a model folder is code, and running it is the user's decision.
"""

from __future__ import annotations

import json
from pathlib import Path

from shared.errors import ConfigError, ModelError
from shared.gguf_base import refuse_gguf_base

# Heads that make a model something other than a next-token predictor.
_NON_CAUSAL_SUFFIXES = (
    "ForMaskedLM",
    "ForSequenceClassification",
    "ForTokenClassification",
    "ForQuestionAnswering",
    "ForMultipleChoice",
    "ForImageClassification",
)


def read_model_config(folder: Path) -> dict:
    """config.json of a model folder, or one clear error (a GGUF file or folder: why it cannot train)."""
    folder = Path(folder)
    refuse_gguf_base(folder)
    config_json = folder / "config.json"
    if not folder.is_dir():
        raise ModelError(f"base_model: {folder} is not a folder; an LLM base model is a Transformers folder")
    if not config_json.is_file():
        raise ModelError(f"base_model: {folder} has no config.json; it is not a Transformers model folder")
    try:
        data = json.loads(config_json.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise ModelError(f"base_model: {config_json} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelError(f"base_model: {config_json} is not a JSON object")
    return data


def check_causal_lm(folder: Path, data: dict, trust_remote_code: bool) -> None:
    """Refuse folders that are not causal LMs, and remote code without the opt-in."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = data.get("model_type")
    archs = data.get("architectures") or []
    auto_map = data.get("auto_map") or {}
    native = model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    remote = "AutoModelForCausalLM" in auto_map
    what = f"{model_type or 'unknown'} model" + (f" ({', '.join(archs)})" if archs else "")
    if not native and not remote:
        raise ModelError(
            f"base_model: {folder} holds a {what}, not a causal language model; "
            "point base_model at a causal LM folder (LLaMA, Qwen, Mistral, GPT-2, ChatGLM, ...)"
        )
    if archs and all(a.endswith(_NON_CAUSAL_SUFFIXES) for a in archs) and not remote:
        raise ModelError(
            f"base_model: {folder} holds a {what}, which has no causal language-model head; "
            "point base_model at a causal LM folder"
        )
    if not native and not trust_remote_code:
        raise ModelError(
            f"base_model: {folder} ships its own model code ({auto_map['AutoModelForCausalLM']} in config.json); "
            "set `trust_remote_code: true` if you trust the Python files in that folder"
        )


def load_tokenizer(folder: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=trust_remote_code
        )
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError... for a missing tokenizer
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"base_model: no usable tokenizer in {folder} ({first[:200]})") from None
    if tokenizer.eos_token_id is None:
        raise ModelError(
            f"base_model: the tokenizer in {folder} defines no EOS token, so the model cannot learn to stop; "
            "set eos_token in its tokenizer_config.json"
        )
    if tokenizer.pad_token_id is None:
        # Padding is masked out of the loss by position (labels -100), never by id, so pad = EOS is
        # safe here: the real EOS at the end of each response keeps its label (masking pad by id would mask
        # EOS too, and the model would never learn to stop).
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_config(load_in_4bit: bool):
    """The bitsandbytes NF4 config for QLoRA, or a clear error where it cannot run."""
    if not load_in_4bit:
        return None
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise ConfigError("load_in_4bit: 4-bit QLoRA needs a CUDA GPU, and none is available; set load_in_4bit: false")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            "load_in_4bit: 4-bit QLoRA needs the bitsandbytes package; `pip install bitsandbytes` "
            "or set load_in_4bit: false"
        )
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
    )


def load_causal_lm(folder: Path, *, trust_remote_code: bool = False, dtype=None, load_in_4bit: bool = False,
                   attn_implementation: str | None = None):
    """The model (eval mode, on the CPU unless quantized) from a local folder, or one clear error.
    `attn_implementation`: transformers' name (None: its default, sdpa where the model has it)."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    data = read_model_config(folder)
    check_causal_lm(folder, data, trust_remote_code)
    quant = quantization_config(load_in_4bit)
    kwargs = dict(local_files_only=True, trust_remote_code=trust_remote_code, output_loading_info=True)
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map={"": 0})
    elif dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    except Exception as exc:  # a broken or foreign folder fails in many ways; name the folder and the cause
        if "Weights only load failed" in str(exc):  # torch's text would suggest weights_only=False: never
            raise ModelError(
                f"base_model: {folder} has a pickle weights file (.bin/.pt) holding Python objects besides "
                "tensors, which could run code when loaded; it was not loaded. Use a .safetensors copy of "
                "the model"
            ) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"base_model: cannot load {folder} as a causal LM ({first[:300]})") from None
    missing = list(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(sorted(missing)[:3])
        raise ModelError(
            f"base_model: {folder} lacks {len(missing)} weights of its causal-LM class ({shown}...); "
            "it is not a complete causal LM checkpoint"
        )
    if model.get_output_embeddings() is None:
        raise ModelError(f"base_model: {folder} has no language-model head; it is not a causal LM")
    model.eval()
    return model


def remote_code_files(folder: Path) -> list[Path]:
    """The Python files a remote-code model folder ships (copied beside a merged export)."""
    return sorted(Path(folder).glob("*.py"))
