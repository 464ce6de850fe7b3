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
    # --- both trainers -------------------------------------------------------------------------
    resume: str | None = _key(
        None,
        "Continue a run from <output_dir>/checkpoints: `latest` (the newest training state; a fresh start "
        "when there is none yet) or a state folder's name such as state-step000200.",
    )
    use_dora: bool = _key(
        False,
        "DoRA (weight-decomposed LoRA). SD: a magnitude per input column, exported as kohya `dora_scale` "
        "the way A1111/ComfyUI apply it; LLM: PEFT's DoRA.",
    )
    sample_prompts: list[str] | None = _key(
        None,
        "SD: prompts rendered with a fixed seed during and after training. LLM: prompts answered greedily "
        "at each checkpoint and at the end (default: up to 3 prompts from the data).",
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
    trust_remote_code: bool = _key(
        False, "LLM: allow a model folder's own Python code (auto_map) to run. Only for folders you trust."
    )
    load_in_4bit: bool = _key(False, "LLM: QLoRA: load the base model in 4-bit NF4 (needs CUDA and bitsandbytes).")
    merge_output: bool = _key(
        False, "LLM: also write the base model with the LoRA merged in, as <output_name>-merged."
    )
    sample_max_tokens: int = _key(64, "LLM: most new tokens per sample generation.")
    # --- SD trainer (issue 3) ---------------------------------------------------------------
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = _key(
        "auto",
        "What the UNet predicts. auto: a diffusers folder's scheduler; in a single file a `v_pred` "
        "marker or, for SD2, the v-prediction fingerprint in the weights (else v for SD2, the 768 "
        "models being the common ones; epsilon for SD1/SDXL).",
    )
    train_text_encoder: bool = _key(False, "Also train LoRA on the text encoder(s).")
    text_encoder_lr: float | None = _key(None, "Learning rate of the text-encoder LoRA. Default: learning_rate.")
    enable_bucket: bool = _key(True, "Aspect-ratio bucketing: train each image near its own shape.")
    bucket_reso_steps: int = _key(64, "Bucket sizes are multiples of this (raised to what the UNet needs).")
    min_bucket_reso: int = _key(256, "Smallest bucket side in pixels (lowered to resolution/2 for small resolutions).")
    max_bucket_reso: int = _key(2048, "Largest bucket side in pixels.")
    bucket_upscale: bool = _key(False, "Enlarge images smaller than the resolution to fill a bucket.")
    caption_extension: str = _key(".txt", "Caption file suffix beside each image.")
    trigger_word: str | None = _key(None, "Put first in every caption (and in the sidecar's activation text).")
    shuffle_caption: bool = _key(False, "Shuffle comma-separated tags every step (the first keep_tokens stay).")
    keep_tokens: int = _key(0, "Tags at the start of a caption that shuffling leaves in place.")
    caption_dropout_rate: float = _key(0.0, "Chance of training a step's image with an empty caption.")
    random_flip: bool = _key(False, "Mirror images left-right at random.")
    random_crop: bool = _key(False, "Crop at a random place instead of the centre.")
    cache_latents: Literal["no", "memory", "disk"] = _key(
        "no", "Encode each image with the VAE once: keep the latents in memory or on disk (reused across runs)."
    )
    cache_dir: Path | None = _key(None, "Disk latent cache folder. Default: ~/.cache/lora-daemon/latents.")
    cache_text_encoder_outputs: bool = _key(
        False, "Encode each caption once (needs a frozen text encoder and fixed captions)."
    )
    noise_offset: float = _key(0.0, "Offset noise strength (0.05-0.1 helps very dark/bright images).")
    min_snr_gamma: float | None = _key(None, "Min-SNR loss weighting gamma (5 is common); empty disables.")
    lora_init_std: float | None = _key(None, "Std of the gaussian LoRA init of A. Default: 1/rank.")
    conv_rank: int = _key(0, "LoCon: LoRA rank on the ResBlock 3x3 convs too (0: off).")
    conv_alpha: float | None = _key(None, "LoCon alpha. Default: conv_rank.")
    optimizer: Literal["adamw", "adamw8bit"] = _key("adamw", "adamw8bit needs bitsandbytes and a CUDA GPU.")
    save_last_n: int = _key(3, "Keep the last N checkpoints and training states (0: keep all).")
    sample_every_n_steps: int = _key(
        0, "Sample every N steps (SD: render sample_prompts; LLM: answer them) (0: SD only at the end, LLM at "
        "each checkpoint and the end)."
    )
    sample_steps: int = _key(20, "Denoising steps per sample image.")
    preferred_weight: float = _key(0.8, "The LoRA weight suggested in the sidecar .json.")
    preview: bool = _key(
        True,
        "SD: write <name>.preview.png beside the LoRA (the picture on its AUTOMATIC1111/Forge card): the first "
        "sample prompt at preferred_weight, or without sample_prompts a training caption. false: no preview.",
    )
    description: str | None = _key(None, "Description for the sidecar .json.")
    # --- multi-process (issue 10): data-parallel through `accelerate launch` -----------------
    num_processes: int = _key(
        1, "Training processes in all (all machines together; usually one per GPU). More than 1 launches "
        "the run through `accelerate launch`; batch_size stays per process."
    )
    num_machines: int = _key(1, "Machines taking part. Each runs the same config with its own machine_rank.")
    machine_rank: int = _key(0, "This machine's number, 0 .. num_machines-1; 0 is the main machine (it writes the outputs).")
    main_process_ip: str | None = _key(
        None, "Address of machine 0 that the others connect to (needed when num_machines > 1)."
    )
    main_process_port: int | None = _key(
        None, "TCP port on machine 0 for the processes to meet (default: a free one on one machine, 29500 on several)."
    )
    accelerate_config: Path | None = _key(
        None,
        "An accelerate config file (`accelerate config` writes one): DeepSpeed/FSDP and other launch "
        "settings pass through. The keys above, when set, override it.",
        must_exist=True,
    )

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
    data = read_config_file(path, overrides)
    return config_from_dict(data, source=str(path), base_dir=path.resolve().parent)


def read_config_file(path: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """The raw `key: value` mapping of a YAML config with `key=value` overrides applied, unvalidated
    (what `submit` sends to the daemon, which validates it)."""
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
    return data


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
    _check_sd_keys(cfg, source)
    _check_upper_bounds(cfg, source)
    _check_multi_process(cfg, source)


def _check_multi_process(cfg: TrainConfig, source: str) -> None:
    """The launch keys: counts, ranks and the rendezvous address fit together."""
    for name in ("num_processes", "num_machines"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{source}: {name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.num_processes < cfg.num_machines:
        raise ConfigError(f"{source}: num_processes ({cfg.num_processes}) counts all machines together and "
                          f"must be at least num_machines ({cfg.num_machines})")
    if cfg.num_processes % cfg.num_machines:
        raise ConfigError(f"{source}: num_processes ({cfg.num_processes}) must split evenly over "
                          f"num_machines ({cfg.num_machines}): the same number of processes on each machine")
    if not 0 <= cfg.machine_rank < cfg.num_machines:
        raise ConfigError(f"{source}: machine_rank must be in 0..{cfg.num_machines - 1} "
                          f"(num_machines is {cfg.num_machines}), got {cfg.machine_rank}")
    if cfg.num_machines > 1 and not cfg.main_process_ip:
        raise ConfigError(f"{source}: main_process_ip is needed with num_machines > 1: the address of "
                          "machine 0 that the other machines connect to")
    if cfg.main_process_port is not None and not 1 <= cfg.main_process_port <= 65535:
        raise ConfigError(f"{source}: main_process_port must be a TCP port (1-65535), got {cfg.main_process_port}")
    if cfg.accelerate_config is not None and not Path(cfg.accelerate_config).is_file():
        raise ConfigError(f"{source}: accelerate_config: {cfg.accelerate_config} is not a file "
                          "(expected the YAML that `accelerate config` writes)")


# Far above any real LoRA run: a typo like `resolution: 51200` or `max_train_steps: 1e12` is refused up
# front with the key named, instead of failing an hour later out of memory (or running for a year).
UPPER_BOUNDS = {
    "resolution": 8192,
    "batch_size": 4096,
    "gradient_accumulation_steps": 4096,
    "lora_rank": 4096,
    "max_train_steps": 10_000_000,
    "epochs": 1_000_000,
    "save_steps": 10_000_000,
    "max_seq_len": 1_048_576,
    "sample_max_tokens": 1_048_576,
}


def _check_upper_bounds(cfg: TrainConfig, source: str) -> None:
    for key, top in UPPER_BOUNDS.items():
        value = getattr(cfg, key)
        if value is not None and value > top:
            raise ConfigError(f"{source}: {key} must be at most {top:,}, got {value:,} (a typo?)")


def _check_sd_keys(cfg: TrainConfig, source: str) -> None:
    """Ranges and combinations of the SD trainer's keys."""
    for name in ("bucket_reso_steps", "min_bucket_reso", "max_bucket_reso", "sample_steps"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{source}: {name} must be at least 1, got {getattr(cfg, name)}")
    for name in ("keep_tokens", "conv_rank", "save_last_n", "sample_every_n_steps"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{source}: {name} may not be negative, got {getattr(cfg, name)}")
    if not 0 <= cfg.caption_dropout_rate < 1:
        raise ConfigError(f"{source}: caption_dropout_rate must be in [0, 1), got {cfg.caption_dropout_rate}")
    if cfg.noise_offset < 0:
        raise ConfigError(f"{source}: noise_offset may not be negative, got {cfg.noise_offset}")
    for name in ("min_snr_gamma", "lora_init_std", "text_encoder_lr", "conv_alpha"):
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise ConfigError(f"{source}: {name} must be positive (or left empty), got {value}")
    if cfg.cache_text_encoder_outputs:
        varying = [k for k in ("train_text_encoder", "shuffle_caption") if getattr(cfg, k)]
        if cfg.caption_dropout_rate > 0:
            varying.append("caption_dropout_rate")
        if varying:
            raise ConfigError(
                f"{source}: cache_text_encoder_outputs needs a frozen text encoder and fixed captions; "
                f"turn off {', '.join(varying)} or the cache"
            )
    if cfg.cache_latents != "no" and cfg.random_crop:
        raise ConfigError(f"{source}: cache_latents keeps one crop per image; turn off random_crop or the cache")


OUTPUT_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


def check_output_name(name: str, source: str = "config") -> None:
    """A LoRA name becomes a file name and a `<lora:NAME:w>` alias: keep it to a safe alphabet."""
    if not name or len(name) > 100 or name.startswith(".") or not set(name) <= OUTPUT_NAME_CHARS:
        raise ConfigError(
            f"{source}: output_name {name!r} must be 1-100 ASCII letters, digits, '_', '-' or '.', "
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
