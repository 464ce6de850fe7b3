"""Load a Flux.1 base model offline from any layout users have, with strict key and shape checks.

Layouts: the Black Forest Labs transformer file (bf16 or float8_e4m3fn) plus separate `ae`, `clip_l`
and `t5xxl` files; ComfyUI's all-in-one checkpoint (`model.diffusion_model.`, `vae.`,
`text_encoders.clip_l.transformer.`, `text_encoders.t5xxl.transformer.`); a diffusers folder. dev and
schnell are told apart by `guidance_in` in the file. Sizes: a `model_config` folder when given, the
shipped configs for files of the published size, else the transformer's own tensor shapes (never
diffusers' single-file converter, which assumes the full 3072 width). Every component is built on
the meta device and loaded only if names and shapes match exactly, so a wrong or truncated file is
one error naming it, never a silent partial load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from shared.errors import ModelError
from shared.flux import layout
from shared.images.checkpoints import load_strict, read_checkpoint

MODEL_CONFIGS = resources.files("shared.flux") / "model_configs"
COMFY_TRANSFORMER = "model.diffusion_model."
COMFY_VAE = ("vae.", "first_stage_model.")
COMFY_CLIP_L = "text_encoders.clip_l.transformer."
COMFY_T5 = "text_encoders.t5xxl.transformer."
# Weights ComfyUI's own text-encoder classes save beside the HF ones; no diffusers component has them
COMFY_IGNORED = ("text_encoders.clip_l.logit_scale", "text_encoders.t5xxl.logit_scale",
                 "text_encoders.clip_l.transformer.text_projection.weight")
PUBLISHED_SIZE = {"num_layers": 19, "num_single_layers": 38, "num_attention_heads": 24, "attention_head_dim": 128}
VARIANTS = ("dev", "schnell")


@dataclass
class FluxModel:
    variant: str  # dev (guidance-distilled, has guidance_in) or schnell
    transformer: Any
    vae: Any
    text_encoder: Any  # CLIP-L: its pooled output conditions the transformer
    text_encoder_2: Any  # T5: its hidden states are the transformer's text tokens
    tokenizer: Any
    tokenizer_2: Any
    scheduler: Any  # FlowMatchEulerDiscreteScheduler, the variant's shipped config
    sources: dict = field(default_factory=dict)

    @property
    def guidance_embeds(self) -> bool:
        return bool(self.transformer.config.guidance_embeds)

    @property
    def resolution_multiple(self) -> int:
        """What an image side must be a multiple of: the autoencoder's downsampling times the 2x2 packing."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1) * 2



def shipped_config_dir(variant: str) -> Path:
    return Path(str(MODEL_CONFIGS / f"flux1-{variant}"))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path}: missing") from None
    except ValueError as exc:
        raise ModelError(f"{path}: not valid JSON ({exc})") from None


def component_configs(variant: str, model_config: Path | None, transformer_sd: dict | None, source: Path) -> dict:
    """Configs of the four components: model_config's where it has them, else the shipped ones
    (real sizes); the transformer's from the file's shapes unless the file has the published size."""
    shipped = shipped_config_dir(variant)
    configs = {}
    for component, name in (("transformer", "config.json"), ("vae", "config.json"), ("text_encoder", "config.json"),
                            ("text_encoder_2", "config.json"), ("scheduler", "scheduler_config.json")):
        own = Path(model_config) / component / name if model_config else None
        if own is not None and own.is_file():
            configs[component] = _read_json(own)
        elif component == "transformer" and transformer_sd is not None:
            try:
                inferred = layout.infer_config(transformer_sd)
            except (KeyError, ValueError, IndexError) as exc:
                raise ModelError(f"{source}: cannot read the transformer's sizes from its weights ({exc})") from None
            published = all(inferred[k] == v for k, v in PUBLISHED_SIZE.items())
            configs[component] = _read_json(shipped / component / name) if published else inferred
        else:
            configs[component] = _read_json(shipped / component / name)
    return configs


def detect_variant(transformer_sd: dict) -> str:
    return "dev" if layout.GUIDANCE_MARKER in transformer_sd else "schnell"


def split_comfy(state_dict: dict, path: Path) -> dict[str, dict]:
    """An all-in-one file's parts by component; unknown keys are an error naming one."""
    parts: dict[str, dict] = {"transformer": {}, "vae": {}, "clip_l": {}, "t5xxl": {}}
    rest = []
    for key, tensor in state_dict.items():
        if key in COMFY_IGNORED:
            continue
        if key.startswith(COMFY_TRANSFORMER):
            parts["transformer"][key[len(COMFY_TRANSFORMER):]] = tensor
        elif key.startswith(COMFY_VAE):
            parts["vae"][key.split(".", 1)[1]] = tensor
        elif key.startswith(COMFY_CLIP_L):
            parts["clip_l"][key[len(COMFY_CLIP_L):]] = tensor
        elif key.startswith(COMFY_T5):
            parts["t5xxl"][key[len(COMFY_T5):]] = tensor
        else:
            rest.append(key)
    if rest:
        raise ModelError(f"{path}: {len(rest)} weights of no Flux component (e.g. {rest[0]})")
    return parts


def storage_cast(dtype, fp8_base: bool):
    """The per-tensor cast of a Flux file: the blocks' Linear weights to float8_e4m3fn with fp8_base,
    every other floating tensor to `dtype` (fp8 text-encoder files are upcast)."""
    import torch

    def cast(key: str, tensor):
        if not tensor.is_floating_point():
            return tensor
        name = key.removeprefix(COMFY_TRANSFORMER)
        if fp8_base and tensor.dim() == 2 and name.startswith(("double_blocks.", "single_blocks.")) and (
            name == key or key.startswith(COMFY_TRANSFORMER)
        ):
            return tensor.to(torch.float8_e4m3fn)
        return tensor.to(dtype)

    return cast


def _is_transformer(state_dict: dict) -> bool:
    return all(k in state_dict for k in layout.MARKER_KEYS)


def load_transformer(state: dict, config: dict, path: Path):
    """The transformer from BFL-named tensors already in their storage dtypes (see storage_cast)."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    from shared.flux.fp8 import adopt_fp8_linears

    try:
        converted, leftover = layout.bfl_to_diffusers(state, config)
    except KeyError as exc:
        raise ModelError(f"{path}: the transformer lacks {exc.args[0]} (a truncated file, or one of another "
                         "model; set model_config for a non-standard size)") from None
    except ValueError as exc:
        raise ModelError(f"{path}: {exc}; set model_config to the model's diffusers config folder") from None
    if leftover:
        raise ModelError(f"{path}: the transformer has {len(leftover)} weights its config does not (e.g. {leftover[0]}); "
                         "set model_config for a non-standard size")
    with init_empty_weights():
        transformer = FluxTransformer2DModel.from_config(config)
    load_strict(transformer, converted, path, "transformer", dtype=None)
    adopt_fp8_linears(transformer)
    return transformer.requires_grad_(False).eval()


def load_vae(state: dict, config: dict, path: Path, dtype):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    with init_empty_weights():
        vae = AutoencoderKL.from_config(config)
    try:
        converted = convert_ldm_vae_checkpoint(state, dict(vae.config))
    except (KeyError, IndexError, AttributeError) as exc:
        raise ModelError(f"{path}: the autoencoder weights do not follow the Flux ae layout ({exc!r})") from None
    extra = sorted(k for k in state if "quant_conv" in k)
    if extra:
        raise ModelError(f"{path}: {extra[0]}: the Flux autoencoder has no quant convs (an SD VAE?)")
    load_strict(vae, converted, path, "autoencoder", dtype=dtype)
    return vae.requires_grad_(False).eval()


def load_clip_l(state: dict, config: dict, path: Path, dtype):
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_empty_weights():
        model = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in config.items() if k not in ("architectures",)}))
    if not hasattr(model, "text_model"):  # transformers 5 dropped the `text_model.` level
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    load_strict(model, state, path, "CLIP-L text encoder", dtype=dtype)
    return model.requires_grad_(False).eval()


def load_t5(state: dict, config: dict, path: Path, dtype):
    from accelerate import init_empty_weights
    from transformers import T5Config, T5EncoderModel

    with init_empty_weights():
        model = T5EncoderModel(T5Config(**{k: v for k, v in config.items() if k not in ("architectures",)}))
    state = dict(state)
    if "shared.weight" in state and "encoder.embed_tokens.weight" not in state:
        state["encoder.embed_tokens.weight"] = state["shared.weight"]  # tied; files store it once
    load_strict(model, state, path, "T5 text encoder", dtype=dtype)
    return model.requires_grad_(False).eval()


def _scheduler(config: dict):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config({k: v for k, v in config.items() if not k.startswith("_")})


def _read(path: Path | None, key: str, cast) -> dict:
    if path is None:
        raise ModelError(f"{key}: needed (a Black Forest Labs transformer file holds only the transformer; set {key} "
                         "to the file, e.g. ComfyUI's models/vae/ae.safetensors, models/text_encoders/clip_l.safetensors, "
                         "t5xxl_fp16.safetensors)")
    if not Path(path).is_file():
        raise ModelError(f"{key}: {path} does not exist")
    return read_checkpoint(Path(path), cast)


def load_single_files(base_model: Path, *, ae: Path | None = None, clip_l: Path | None = None,
                      t5xxl: Path | None = None, t5_tokenizer: Path | None = None, model_config: Path | None = None,
                      dtype=None, fp8_base: bool = False) -> FluxModel:
    """A BFL transformer file (with the ae/clip_l/t5xxl files) or a ComfyUI all-in-one checkpoint.
    Separate files given beside an all-in-one checkpoint replace its parts."""
    import torch

    from shared.flux.tokenizers import T5_MAX_LENGTH, clip_tokenizer, find_t5_tokenizer, load_t5_tokenizer

    dtype = dtype or torch.bfloat16
    base_model = Path(base_model)
    cast = storage_cast(dtype, fp8_base)
    state = read_checkpoint(base_model, cast)
    if any(k.startswith((COMFY_TRANSFORMER + "double_blocks.", COMFY_TRANSFORMER + "img_in.")) for k in state):
        parts = split_comfy(state, base_model)
    elif _is_transformer(state):
        parts = {"transformer": state, "vae": {}, "clip_l": {}, "t5xxl": {}}
    elif any(k.startswith("transformer_blocks.") for k in state) or any(".lora_down." in k for k in state):
        raise ModelError(f"{base_model}: not a Flux base model (diffusers-named weights or a LoRA); use the Black "
                         "Forest Labs file (flux1-dev.safetensors) or the diffusers folder")
    else:
        raise ModelError(f"{base_model}: not a Flux transformer (none of {', '.join(layout.MARKER_KEYS)})")
    if not _is_transformer(parts["transformer"]):
        raise ModelError(f"{base_model}: the Flux transformer is incomplete (missing {layout.MARKER_KEYS[0]})")
    sources = {"transformer": base_model}
    for key, path in (("vae", ae), ("clip_l", clip_l), ("t5xxl", t5xxl)):
        if path is not None or not parts[key]:
            parts[key] = _read(path, {"vae": "ae"}.get(key, key), storage_cast(dtype, False))
            sources[key] = Path(path)
        else:
            sources[key] = base_model
    for key, prefix in (("vae", "vae."), ("clip_l", COMFY_CLIP_L), ("t5xxl", COMFY_T5)):
        if any(k.startswith(prefix) for k in parts[key]):  # a part saved from an all-in-one file
            parts[key] = {k.removeprefix(prefix): v for k, v in parts[key].items()}
    variant = detect_variant(parts["transformer"])
    configs = component_configs(variant, model_config, parts["transformer"], base_model)
    if bool(configs["transformer"].get("guidance_embeds")) != (variant == "dev"):
        raise ModelError(f"{base_model}: a FLUX.1-{variant} file (guidance_in {'present' if variant == 'dev' else 'absent'}) "
                         f"but model_config says guidance_embeds={configs['transformer'].get('guidance_embeds')}")
    transformer = load_transformer(parts["transformer"], configs["transformer"], base_model)
    vae = load_vae(parts["vae"], configs["vae"], sources["vae"], dtype)
    clip = load_clip_l(parts["clip_l"], configs["text_encoder"], sources["clip_l"], dtype)
    t5 = load_t5(parts["t5xxl"], configs["text_encoder_2"], sources["t5xxl"], dtype)
    tokenizer_dir = find_t5_tokenizer([p for p in sources.values()], t5_tokenizer)
    sources["t5_tokenizer"] = tokenizer_dir
    return FluxModel(variant, transformer, vae, clip, t5, clip_tokenizer(),
                     load_t5_tokenizer(tokenizer_dir, T5_MAX_LENGTH[variant]), _scheduler(configs["scheduler"]), sources)


def load_diffusers_folder(folder: Path, *, dtype=None, fp8_base: bool = False,
                          t5_tokenizer: Path | None = None) -> FluxModel:
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    from shared.flux.fp8 import store_in_fp8
    from shared.flux.tokenizers import T5_MAX_LENGTH, clip_tokenizer, find_t5_tokenizer, load_t5_tokenizer

    dtype = dtype or torch.bfloat16
    folder = Path(folder)
    index = _read_json(folder / "model_index.json")
    if index.get("_class_name") not in ("FluxPipeline", None) and "transformer" not in index:
        raise ModelError(f"{folder}: not a Flux diffusers folder (model_index.json names {index.get('_class_name')})")
    try:
        transformer = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=dtype,
                                                             local_files_only=True)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype, local_files_only=True)
        clip = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=dtype, local_files_only=True)
        t5 = T5EncoderModel.from_pretrained(folder, subfolder="text_encoder_2", dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{folder}: cannot load the diffusers Flux model ({str(exc).splitlines()[0][:200]})") from None
    if fp8_base:
        store_in_fp8(transformer)
    variant = "dev" if transformer.config.guidance_embeds else "schnell"
    tokenizer = clip_tokenizer()
    if (folder / "tokenizer" / "vocab.json").is_file():
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
    tokenizer_dir = find_t5_tokenizer([folder / "model_index.json"], t5_tokenizer)
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    scheduler = _read_json(scheduler_file if scheduler_file.is_file()
                           else shipped_config_dir(variant) / "scheduler" / "scheduler_config.json")
    models = [m.requires_grad_(False).eval() for m in (transformer, vae, clip, t5)]
    return FluxModel(variant, *models, tokenizer, load_t5_tokenizer(tokenizer_dir, T5_MAX_LENGTH[variant]),
                     _scheduler(scheduler), {"transformer": folder, "t5_tokenizer": tokenizer_dir})


def looks_like_flux(path: Path) -> bool:
    """Whether `path` is a Flux base model (a diffusers FluxPipeline folder, or a .safetensors file with
    the BFL transformer's marker keys, bare or under ComfyUI's prefix), from names only: for `task: auto`."""
    path = Path(path)
    if path.is_dir():
        index = path / "model_index.json"
        try:
            return index.is_file() and json.loads(index.read_text(encoding="utf-8")).get("_class_name") == "FluxPipeline"
        except ValueError:
            return False
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return False
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = set(fh.keys())
    except (SafetensorError, OSError):
        return False
    return any(all(prefix + k in keys for k in layout.MARKER_KEYS) for prefix in ("", COMFY_TRANSFORMER))


def load_flux_model(base_model: Path, *, ae: Path | None = None, clip_l: Path | None = None,
                    t5xxl: Path | None = None, t5_tokenizer: Path | None = None, model_config: Path | None = None,
                    dtype=None, fp8_base: bool = False) -> FluxModel:
    """Any Flux layout: a diffusers folder, a ComfyUI all-in-one file, or a BFL transformer file with
    `ae`, `clip_l`, `t5xxl`. `dtype` (default bf16) is the storage and compute dtype; `fp8_base`
    stores the transformer blocks' Linear weights in float8_e4m3fn."""
    base_model = Path(base_model)
    if base_model.is_dir():
        return load_diffusers_folder(base_model, dtype=dtype, fp8_base=fp8_base, t5_tokenizer=t5_tokenizer)
    return load_single_files(base_model, ae=ae, clip_l=clip_l, t5xxl=t5xxl, t5_tokenizer=t5_tokenizer,
                             model_config=model_config, dtype=dtype, fp8_base=fp8_base)
