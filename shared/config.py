"""The training config: one flat set of keys, read from YAML, checked before anything heavy loads.

The seed's keys (`train_data_dir`, `metadata_path`, `base_model`, `lora_rank`, ...) keep their names
and defaults. Every key lives in `TrainConfig` with its type, default and help text, so validation,
`--set` overrides and the docs all come from one place. Relative paths are resolved against the
folder of the config file (or the daemon client's stated base folder), never the process's cwd.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from shared.errors import ConfigError

SD_CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def _key(default: Any, help: str, *, required: bool = False, must_exist: bool = False):
    return field(default=default, metadata={"help": help, "required": required, "must_exist": must_exist})


@dataclass
class TrainConfig:
    # --- what to train -------------------------------------------------------------------------
    base_model: Path | None = _key(
        None,
        "Base model: an SD/SDXL single file (.safetensors/.ckpt), a diffusers folder, "
        "or a Transformers causal-LM folder.",
        required=True,
        must_exist=True,
    )
    task: Literal["auto", "sd", "llm"] = _key("auto", "sd or llm; auto detects it from base_model.")
    model_config: Path | None = _key(
        None,
        "A diffusers-format folder of component configs (model_index.json, unet/, vae/, ...) for a "
        "single-file checkpoint of a non-standard size. Standard SD1.5 files need nothing.",
        must_exist=True,
    )
    # --- data ----------------------------------------------------------------------------------
    train_data_dir: Path | None = _key(
        None, "Folder of training images (SD) or data file/folder (LLM).", required=True, must_exist=True
    )
    metadata_path: Path | None = _key(
        None,
        "CSV of `file,caption` rows. Default: <train_data_dir>/metadata.csv when it exists, "
        "else one .txt caption beside each image.",
        must_exist=True,
    )
    resolution: int = _key(512, "Training resolution in pixels (images are resized and cropped to it).")
    # --- LoRA ----------------------------------------------------------------------------------
    lora_rank: int = _key(8, "LoRA rank (network dim).")
    lora_alpha: float = _key(16.0, "LoRA alpha; the update is scaled by alpha / rank.")
    lora_dropout: float = _key(0.1, "Dropout on the LoRA input during training.")
    lora_init: Literal["default", "gaussian"] = _key(
        "default", "LoRA init: default (Kaiming A, zero B) or gaussian (A ~ N(0, 1/rank), zero B)."
    )
    # --- optimisation --------------------------------------------------------------------------
    batch_size: int = _key(1, "Images (or sequences) per step on each device.")
    gradient_accumulation_steps: int = _key(1, "Micro-batches summed before each optimizer step.")
    epochs: int = _key(10, "Passes over the data set (ignored when max_train_steps is set).")
    max_train_steps: int | None = _key(None, "Stop after this many optimizer steps.")
    learning_rate: float = _key(2e-4, "AdamW learning rate.")
    weight_decay: float = _key(0.01, "AdamW weight decay.")
    max_grad_norm: float = _key(1.0, "Clip gradients to this norm (0 disables).")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = _key(
        "cosine", "Learning-rate schedule after warm-up."
    )
    lr_warmup_steps: int = _key(0, "Linear warm-up steps at the start.")
    seed: int = _key(42, "Random seed for init, noise, timesteps and data order.")
    mixed_precision: Literal["no", "fp16", "bf16"] = _key("no", "Mixed precision (GPU only).")
    gradient_checkpointing: bool = _key(False, "Trade compute for memory in the UNet / LM.")
    device: str = _key("auto", "auto, cpu, cuda, cuda:1, mps.")
    # --- output --------------------------------------------------------------------------------
    output_dir: Path | None = _key(None, "Folder for the LoRA file and checkpoints.", required=True)
    output_name: str | None = _key(
        None, "File name of the LoRA and its <lora:NAME:w> alias. Default: last part of output_dir."
    )
    log_dir: Path | None = _key(None, "TensorBoard logs. Default: <output_dir>/logs.")
    save_steps: int = _key(500, "Save a checkpoint every N optimizer steps (0: only at the end).")
    deploy_dir: Path | None = _key(
        None, "A host's Lora folder: the finished file is copied there under a name that never overwrites."
    )
    resume: str | None = _key(
        None,
        "LLM: continue from a checkpoint in <output_dir>/checkpoints: `latest` (the newest, or a fresh "
        "start when there is none) or a checkpoint's name (step-000200).",
    )
    # --- LLM (task llm) ------------------------------------------------------------------------
    max_seq_len: int = _key(1024, "LLM: tokens per sample; longer samples are cut (and counted in the log).")
    train_on_prompt: bool = _key(False, "LLM: also train on prompt tokens (default: loss on the answers only).")
    chat_template: str | None = _key(
        None,
        "LLM: template for chat/alpaca rows: the tokenizer's own by default; `chatml` or `alpaca` "
        "for a tokenizer without one (or to override it).",
    )
    packing: bool = _key(False, "LLM: join short samples into sequences of up to max_seq_len tokens.")
    val_split: float = _key(
        0.0, "LLM: fraction of samples held out for eval loss and perplexity (0.1 = 10%; 0: none)."
    )
    target_modules: list[str] | None = _key(
        None,
        "LLM: module names that get LoRA (e.g. [q_proj, v_proj] or [query_key_value]); default: every "
        "linear layer except the output head.",
    )
    use_rslora: bool = _key(False, "LLM: rank-stabilised LoRA (scale alpha/sqrt(rank) instead of alpha/rank).")
    use_dora: bool = _key(False, "LLM: DoRA (weight-decomposed LoRA).")
    trust_remote_code: bool = _key(
        False, "LLM: allow a model folder's own Python code (auto_map) to run. Only for folders you trust."
    )
    load_in_4bit: bool = _key(False, "LLM: QLoRA: load the base model in 4-bit NF4 (needs CUDA and bitsandbytes).")
    merge_output: bool = _key(
        False, "LLM: also write the base model with the LoRA merged in, as <output_name>-merged."
    )
    sample_prompts: list[str] | None = _key(
        None,
        "LLM: prompts answered greedily at each checkpoint and at the end, written to the log "
        "(default: up to 3 prompts from the data).",
    )
    sample_max_tokens: int = _key(64, "LLM: most new tokens per sample generation.")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able snapshot (paths as strings) for logs, metadata and the daemon's job record."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = str(value) if isinstance(value, Path) else value
        return out

    @property
    def resolved_output_name(self) -> str:
        return self.output_name or Path(self.output_dir).name


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config, apply `key=value` overrides, validate, return a TrainConfig."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of `key: value` lines, got {type(data).__name__}")
    data = dict(data)
    data.update(parse_overrides(overrides or []))
    return config_from_dict(data, source=str(path), base_dir=path.resolve().parent)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return out


def config_from_dict(data: dict[str, Any], *, source: str = "config", base_dir: Path | None = None) -> TrainConfig:
    """Validate a mapping of config keys. `source` names the file (or client) in every error."""
    base_dir = Path(base_dir) if base_dir is not None else Path.cwd()
    values: dict[str, Any] = {}
    for key, raw in data.items():
        if key not in FIELDS:
            raise ConfigError(f"{source}: unknown key {key!r}{_did_you_mean(str(key))}")
        values[key] = _coerce(key, raw, _HINTS[key], source, base_dir)
    cfg = TrainConfig(**values)
    _check_required_and_paths(cfg, source)
    _check_ranges(cfg, source)
    return cfg


def _did_you_mean(key: str) -> str:
    close = difflib.get_close_matches(key, FIELDS, n=1)
    return f" (did you mean {close[0]!r}?)" if close else " (see docs/config.md for the keys)"


def _coerce(key: str, raw: Any, hint: Any, source: str, base_dir: Path) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType) and type(None) in args:
        if raw is None:
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(key, raw, inner, source, base_dir)
    if raw is None:
        raise ConfigError(f"{source}: {key} may not be empty")
    if origin is Literal:
        if raw not in args:
            raise ConfigError(f"{source}: {key}: {raw!r} is not one of {', '.join(map(str, args))}")
        return raw
    if origin is list:
        if isinstance(raw, str):
            raw = [part.strip() for part in raw.split(",") if part.strip()]
        if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
            raise ConfigError(f"{source}: {key}: expected a list of names, got {raw!r}")
        return raw
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        raise ConfigError(f"{source}: {key}: expected true or false, got {raw!r}")
    if hint is int:
        if isinstance(raw, bool):
            raise ConfigError(f"{source}: {key}: expected a whole number, got {raw!r}")
        if isinstance(raw, int):
            return raw
        if isinstance(raw, float) and raw.is_integer():
            return int(raw)
        if isinstance(raw, str):
            try:
                return int(raw.strip())
            except ValueError:
                pass
        raise ConfigError(f"{source}: {key}: expected a whole number, got {raw!r}")
    if hint is float:
        if isinstance(raw, bool):
            raise ConfigError(f"{source}: {key}: expected a number, got {raw!r}")
        if isinstance(raw, (int, float)):
            return float(raw)
        if isinstance(raw, str):  # YAML 1.1 reads `2e-4` as a string
            try:
                return float(raw.strip())
            except ValueError:
                pass
        raise ConfigError(f"{source}: {key}: expected a number, got {raw!r}")
    if hint is str:
        if isinstance(raw, (str, int, float)) and not isinstance(raw, bool):
            return str(raw)
        raise ConfigError(f"{source}: {key}: expected text, got {raw!r}")
    if hint is Path:
        if not isinstance(raw, (str, Path)) or not str(raw).strip():
            raise ConfigError(f"{source}: {key}: expected a path, got {raw!r}")
        p = Path(str(raw)).expanduser()
        return p if p.is_absolute() else (base_dir / p)
    if hint is dict or typing.get_origin(hint) is dict:
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: {key}: expected a mapping, got {raw!r}")
        return raw
    raise TypeError(f"config key {key} has an unsupported type {hint}")  # a bug in TrainConfig itself


def _check_required_and_paths(cfg: TrainConfig, source: str) -> None:
    for name, f in FIELDS.items():
        value = getattr(cfg, name)
        if f.metadata.get("required") and value is None:
            raise ConfigError(f"{source}: missing required key {name!r} ({f.metadata['help']})")
        if f.metadata.get("must_exist") and value is not None and not Path(value).exists():
            raise ConfigError(f"{source}: {name}: {value} does not exist")


def _check_ranges(cfg: TrainConfig, source: str) -> None:
    positive = ["lora_rank", "batch_size", "gradient_accumulation_steps", "resolution", "sample_max_tokens"]
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{source}: {name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.max_train_steps is None and cfg.epochs < 1:
        raise ConfigError(f"{source}: epochs must be at least 1 (or set max_train_steps), got {cfg.epochs}")
    if cfg.max_train_steps is not None and cfg.max_train_steps < 1:
        raise ConfigError(f"{source}: max_train_steps must be at least 1, got {cfg.max_train_steps}")
    if not 0 < cfg.learning_rate < 1:
        raise ConfigError(f"{source}: learning_rate must be between 0 and 1, got {cfg.learning_rate}")
    if not 0 <= cfg.lora_dropout < 1:
        raise ConfigError(f"{source}: lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    if cfg.lora_alpha <= 0:
        raise ConfigError(f"{source}: lora_alpha must be positive, got {cfg.lora_alpha}")
    for name in ("save_steps", "lr_warmup_steps"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{source}: {name} may not be negative, got {getattr(cfg, name)}")
    if cfg.output_name is not None:
        check_output_name(cfg.output_name, source)
    if cfg.max_seq_len < 8:
        raise ConfigError(f"{source}: max_seq_len must be at least 8, got {cfg.max_seq_len}")
    if not 0 <= cfg.val_split < 1:
        raise ConfigError(f"{source}: val_split must be in [0, 1) (a fraction of the samples), got {cfg.val_split}")
    if cfg.target_modules is not None and not cfg.target_modules:
        raise ConfigError(f"{source}: target_modules is empty; leave it out for the default (all linear layers)")
    if cfg.load_in_4bit and cfg.merge_output:
        raise ConfigError(
            f"{source}: merge_output cannot merge into a 4-bit model; train with load_in_4bit and merge "
            "the adapter into the full-precision model separately, or set merge_output: false"
        )
    if cfg.resolution % 8:
        raise ConfigError(f"{source}: resolution must be a multiple of 8, got {cfg.resolution}")


OUTPUT_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


def check_output_name(name: str, source: str = "config") -> None:
    """A LoRA name becomes a file name and a `<lora:NAME:w>` alias: keep it to a safe alphabet."""
    if not name or len(name) > 100 or name.startswith(".") or not set(name) <= OUTPUT_NAME_CHARS:
        raise ConfigError(
            f"{source}: output_name {name!r} must be 1-100 letters, digits, '_', '-' or '.', "
            "not starting with '.'"
        )


def detect_task(cfg: TrainConfig) -> str:
    """sd or llm, from the config's `task` or from what `base_model` looks like."""
    if cfg.task != "auto":
        return cfg.task
    base = Path(cfg.base_model)
    if base.is_file():
        if base.suffix.lower() in SD_CHECKPOINT_SUFFIXES:
            return "sd"
        raise ConfigError(
            f"base_model: {base} is a file but not a checkpoint (.safetensors or .ckpt); "
            "an LLM base model is a folder with config.json"
        )
    if (base / "model_index.json").is_file() or (base / "unet").is_dir():
        return "sd"
    if (base / "config.json").is_file():
        # A Transformers folder: the LLM loader says whether it is a causal LM, naming what it is.
        return "llm"
    raise ConfigError(
        f"base_model: cannot tell what {base} is: expected an SD checkpoint file, a diffusers folder "
        "(model_index.json) or a Transformers causal-LM folder (config.json); set `task: sd` or `task: llm`"
    )


# Other option sets (e.g. auto-label jobs) check their values with the same rules and messages.
coerce_value = _coerce
