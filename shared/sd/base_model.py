"""Load an SD base model offline: single-file checkpoints (.safetensors, .ckpt) or diffusers folders.

We do not call `from_single_file`: offline it needs a local config folder (without `config=` it asks
the hub even with `local_files_only=True`), and it does not report a bad file: unknown UNet/VAE keys
are dropped and unexpected text-encoder keys skipped without a word. Instead the components are built from shipped (or given) config
folders, diffusers' own LDM converters rename the weights, and `load_state_dict(strict=True)` turns
any mismatch into an error that names the file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from shared.errors import ModelError
from shared.images.checkpoints import into, load_strict, read_checkpoint
from shared.sd.ldm_layout import VAE_PREFIX

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL_CONFIGS = resources.files("shared.sd") / "model_configs"

# Markers of the model families in LDM ("single file") checkpoints: SD1's CLIP-L, SD2's OpenCLIP
# (`cond_stage_model.model.*`), SDXL's two encoders (`conditioner.embedders.0/1`)
SD1_TEXT_KEY = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_TEXT1_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TEXT2_PREFIX = "conditioner.embedders.1.model."
SDXL_REFINER_TEXT_PREFIX = "conditioner.embedders.0.model."
UNET_KEY_PREFIX = "model.diffusion_model."
V_PRED_MARKER = "v_pred"  # an empty tensor some v-prediction checkpoints carry (ComfyUI reads it too)

# What A1111/Forge/kohya call each family (ss_base_model_version, ss_v2, modelspec.architecture).
# "sd2_v" is SD2 trained with v-prediction (the 768 models); the hosts list it separately.
ARCHITECTURES = {
    "sd1": {"ss_base_model_version": "sd_v1", "ss_v2": "False", "modelspec": "stable-diffusion-v1/lora"},
    "sd2": {"ss_base_model_version": "sd_v2", "ss_v2": "True", "modelspec": "stable-diffusion-v2-512/lora"},
    "sd2_v": {"ss_base_model_version": "sd_v2_v", "ss_v2": "True", "modelspec": "stable-diffusion-v2-768-v/lora"},
    "sdxl": {"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False",
             "modelspec": "stable-diffusion-xl-v1-base/lora"},
}
# Shipped config folder per family (real sizes); SD2 picks sd2_v for v-prediction files.
SHIPPED_CONFIG = {"sd1": "sd15", "sd2": "sd2", "sd2_v": "sd2_v", "sdxl": "sdxl"}
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class SDModel:
    arch: str  # family: sd1, sd2 or sdxl
    source: Path
    unet: Any
    vae: Any
    text_encoders: list
    tokenizers: list
    noise_scheduler: Any
    configs: dict = field(default_factory=dict)

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def metadata_arch(self) -> str:
        """The ARCHITECTURES entry: SD2 splits by prediction type."""
        if self.arch == "sd2" and self.prediction_type == "v_prediction":
            return "sd2_v"
        return self.arch

    @property
    def is_sdxl(self) -> bool:
        return self.arch == "sdxl"

    @property
    def resolution_multiple(self) -> int:
        return downsampling_multiple(self.vae, self.unet)


def downsampling_multiple(vae, unet) -> int:
    """What an image side must be a multiple of to survive the VAE's and the UNet's downsampling
    (diffusers halves after every block but the last)."""
    return 2 ** (len(vae.config.block_out_channels) - 1) * 2 ** (len(unet.config.down_block_types) - 1)


def detect_architecture(state_dict: dict, path: Path) -> str:
    """sd1, sd2 or sdxl from the weight names; a clear error naming anything else."""
    return detect_architecture_from_shapes({k: tuple(v.shape) for k, v in state_dict.items()}, path)


def detect_architecture_from_shapes(shapes: dict[str, tuple[int, ...]], path: Path) -> str:
    """detect_architecture from {weight name: shape}, as a safetensors header gives them (the pre-flight
    reads the family this way without loading a weight)."""
    state_dict = shapes
    has_unet = any(k.startswith(UNET_KEY_PREFIX) for k in state_dict)
    conv_in = state_dict.get(UNET_KEY_PREFIX + "input_blocks.0.0.weight")
    if has_unet and conv_in is not None and len(conv_in) == 4 and conv_in[1] != 4:
        raise ModelError(
            f"{path}: an inpainting/instruct UNet ({conv_in[1]} input channels); only text-to-image "
            "SD1.x/SD2.x/SDXL base models are trained"
        )
    if any(k.startswith(SDXL_TEXT2_PREFIX) for k in state_dict) and has_unet:
        return "sdxl"
    if any(k.startswith(SDXL_REFINER_TEXT_PREFIX) for k in state_dict):
        raise ModelError(f"{path}: an SDXL refiner; train LoRAs on the SDXL base model instead")
    if any(k.startswith(SD2_TEXT_PREFIX) for k in state_dict) and has_unet:
        return "sd2"
    if SD1_TEXT_KEY in state_dict and has_unet:
        return "sd1"
    if any(k.startswith(("transformer_blocks.", "double_blocks.", "joint_blocks.", "model.diffusion_model.joint_blocks.",
                         "model.diffusion_model.double_blocks.")) for k in state_dict):
        raise ModelError(
            f"{path}: a transformer (Flux/SD3-style) checkpoint; only SD1.x/SD2.x/SDXL UNets are trained"
        )
    if has_unet:
        raise ModelError(f"{path}: a UNet without a text encoder we know (not SD1.x/SD2.x/SDXL)")
    raise ModelError(
        f"{path}: not a Stable Diffusion checkpoint (found none of the SD UNet + text encoder weights; "
        f"{len(state_dict)} tensors)"
    )


def detect_prediction_type(state_dict: dict, arch: str) -> str | None:
    """v_prediction or epsilon when the weights tell, else None.

    The weights rarely say it. Two signs are used, as ComfyUI does: a `v_pred` marker key, and for
    SD2 the spread of the last output block's first norm1 bias, which v-prediction training pushes
    above 0.09 while the epsilon models stay below.
    """
    if V_PRED_MARKER in state_dict:
        return "v_prediction"
    if arch != "sd2":
        return None
    blocks = [int(k.split(".")[3]) for k in state_dict if k.startswith(UNET_KEY_PREFIX + "output_blocks.")]
    if not blocks:
        return None
    bias = state_dict.get(f"{UNET_KEY_PREFIX}output_blocks.{max(blocks)}.1.transformer_blocks.0.norm1.bias")
    if bias is None:
        return None
    return "v_prediction" if float(bias.float().std(unbiased=False)) > 0.09 else "epsilon"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path}: missing (a model config folder needs unet/, vae/, text_encoder/ configs)") from None
    except ValueError as exc:
        raise ModelError(f"{path}: not valid JSON ({exc})") from None


def read_component_configs(folder: Path) -> dict[str, dict]:
    folder = Path(folder)
    configs = {
        "unet": _read_json(folder / "unet" / "config.json"),
        "vae": _read_json(folder / "vae" / "config.json"),
        "text_encoder": _read_json(folder / "text_encoder" / "config.json"),
    }
    if (folder / "text_encoder_2" / "config.json").is_file():
        configs["text_encoder_2"] = _read_json(folder / "text_encoder_2" / "config.json")
    scheduler = folder / "scheduler" / "scheduler_config.json"
    configs["scheduler"] = _read_json(scheduler) if scheduler.is_file() else {}
    return configs


def shipped_config_dir(name: str) -> Path:
    return Path(str(MODEL_CONFIGS / SHIPPED_CONFIG[name]))


def _text_encoder(config: dict, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(**{k: v for k, v in config.items() if k not in ("architectures", "_name_or_path")})
    return CLIPTextModelWithProjection(cfg) if with_projection else CLIPTextModel(cfg)


def _fit_to_model(text_sd: dict, model) -> dict:
    """transformers 5 dropped the `text_model.` level in CLIPTextModel (not in ...WithProjection)."""
    if hasattr(model, "text_model"):
        return text_sd
    return {k.removeprefix("text_model."): v for k, v in text_sd.items()}


def _scheduler(configs: dict, prediction_type: str):
    from diffusers import DDPMScheduler

    base = configs.get("scheduler") or _read_json(shipped_config_dir("sd1") / "scheduler" / "scheduler_config.json")
    # Training always uses DDPM noise; a pipeline's Euler/PNDM config carries the same betas.
    base = {k: v for k, v in base.items() if not k.startswith("_")}
    return DDPMScheduler.from_config({**base, "prediction_type": prediction_type})


def _tokenizers(arch: str) -> list:
    from shared.images.clip_tokenizer import clip_tokenizer

    if arch == "sd1":
        return [clip_tokenizer()]
    if arch == "sd2":
        return [clip_tokenizer(pad_token="!")]
    return [clip_tokenizer(), clip_tokenizer(pad_token="!")]


def resolve_prediction_type(requested: str, detected: str | None, configs: dict, arch: str) -> str:
    if requested in PREDICTION_TYPES:
        return requested
    if detected:
        return detected
    from_config = (configs.get("scheduler") or {}).get("prediction_type")
    return from_config or "epsilon"


def load_single_file(path: Path, model_config: Path | None = None, prediction_type: str = "auto",
                     dtype: Any = None) -> SDModel:
    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    path = Path(path)
    storage = dtype or torch.float32
    # the VAE stays in the file's type until its own storage type is known (fp32 for SDXL's): a bf16
    # round trip would round it
    checkpoint = read_checkpoint(path, into(storage, keep=(VAE_PREFIX,)))
    arch = detect_architecture(checkpoint, path)
    detected = detect_prediction_type(checkpoint, arch)
    if model_config:
        config_dir = Path(model_config)
    elif arch == "sd2":
        # SD2 without a sign in the weights: the 768 v-prediction models are the common ones
        v = (prediction_type if prediction_type != "auto" else detected or "v_prediction") == "v_prediction"
        config_dir = shipped_config_dir("sd2_v" if v else "sd2")
    else:
        config_dir = shipped_config_dir(arch)
    configs = read_component_configs(config_dir)
    if arch == "sdxl" and "text_encoder_2" not in configs:
        raise ModelError(f"{config_dir}: an SDXL model_config needs text_encoder_2/config.json")
    prediction = resolve_prediction_type(prediction_type, detected, configs, arch)

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        if arch == "sdxl":
            text_encoders = [_text_encoder(configs["text_encoder"], False), _text_encoder(configs["text_encoder_2"], True)]
        else:
            text_encoders = [_text_encoder(configs["text_encoder"], False)]

    try:
        unet_sd = convert_ldm_unet_checkpoint(checkpoint, dict(unet.config))
        vae_sd = convert_ldm_vae_checkpoint(checkpoint, dict(vae.config))
    except (KeyError, IndexError, AttributeError) as exc:
        raise ModelError(f"{path}: the UNet/VAE weights do not follow the SD layout ({exc!r})") from None
    load_strict(unet, unet_sd, path, "UNet", dtype=storage)
    load_strict(vae, vae_sd, path, "VAE", dtype=vae_storage(configs["vae"], storage))
    if arch == "sd1":
        texts = [convert_ldm_clip_checkpoint(checkpoint)]
    elif arch == "sd2":
        texts = [convert_open_clip_checkpoint(text_encoders[0], checkpoint, prefix=SD2_TEXT_PREFIX)]
    else:
        clip_l = {k: v for k, v in checkpoint.items() if k.startswith(SDXL_TEXT1_PREFIX)}
        texts = [
            convert_ldm_clip_checkpoint(clip_l),
            convert_open_clip_checkpoint(text_encoders[1], checkpoint, prefix=SDXL_TEXT2_PREFIX),
        ]
    for i, (encoder, text_sd) in enumerate(zip(text_encoders, texts)):
        load_strict(encoder, _fit_to_model(text_sd, encoder), path, "text encoder" + (f" {i + 1}" if i else ""),
                    dtype=storage)

    return SDModel(
        arch=arch,
        source=path,
        unet=unet,
        vae=vae,
        text_encoders=text_encoders,
        tokenizers=_tokenizers(arch),
        noise_scheduler=_scheduler(configs, prediction),
        configs=configs,
    )


def _component(folder: Path, cls, dtype):
    """One component of a diffusers folder in `dtype`. Its weights in one `.safetensors` file (or a
    sharded set) are streamed into that type (shared/weight_files.py: the file is never held whole);
    other layouts (`.bin`, variants only) go through `from_pretrained`."""
    from accelerate import init_empty_weights

    stem = "model" if cls.__module__.startswith("transformers") else "diffusion_pytorch_model"
    single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
    if not single.is_file() and not index.is_file():
        kwargs = {"dtype" if stem == "model" else "torch_dtype": dtype}
        return cls.from_pretrained(folder, local_files_only=True, **kwargs)
    files = [single] if single.is_file() else sorted({folder / f for f in _read_json(index)["weight_map"].values()})
    with init_empty_weights():
        if stem == "model":
            model = _text_encoder(_read_json(folder / "config.json"), cls.__name__.endswith("WithProjection"))
        else:
            model = cls.from_config(cls.load_config(folder))
    state = {}
    for file in files:
        state.update(read_checkpoint(file, into(dtype)))
    load_strict(model, _fit_to_model(state, model) if stem == "model" else state, folder, folder.name, dtype=dtype)
    return model


def load_diffusers_folder(folder: Path, prediction_type: str = "auto", dtype: Any = None) -> SDModel:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(folder)
    index = _read_json(folder / "model_index.json")
    sdxl = "text_encoder_2" in index
    storage = dtype or torch.float32
    try:  # each component read tensor by tensor straight into its storage type
        unet = _component(folder / "unet", UNet2DConditionModel, storage)
        vae = _component(folder / "vae", AutoencoderKL, vae_storage(_read_json(folder / "vae" / "config.json"), storage))
        text_encoders = [_component(folder / "text_encoder", CLIPTextModel, storage)]
        if sdxl:
            text_encoders.append(_component(folder / "text_encoder_2", CLIPTextModelWithProjection, storage))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{folder}: cannot load the diffusers model ({str(exc).splitlines()[0]})") from None
    if unet.config.in_channels != 4:
        raise ModelError(f"{folder}: an inpainting/instruct UNet ({unet.config.in_channels} input channels); "
                         "only text-to-image SD1.x/SD2.x/SDXL base models are trained")
    if sdxl:
        arch = "sdxl"
    elif unet.config.cross_attention_dim == text_encoders[0].config.hidden_size and text_encoders[0].config.hidden_act == "gelu":
        arch = "sd2"  # OpenCLIP ViT-H (gelu); SD1's CLIP-L uses quick_gelu
    else:
        arch = "sd1"
    tokenizers = _tokenizers(arch)
    for i, sub in enumerate(("tokenizer", "tokenizer_2")[: len(tokenizers)]):
        if (folder / sub / "vocab.json").is_file():
            tokenizers[i] = CLIPTokenizer.from_pretrained(folder, subfolder=sub, local_files_only=True)
    configs = {"unet": dict(unet.config), "vae": dict(vae.config)}
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    configs["scheduler"] = _read_json(scheduler_file) if scheduler_file.is_file() else {}
    prediction = resolve_prediction_type(prediction_type, None, configs, arch)
    scheduler = _scheduler(configs, prediction)
    return SDModel(arch, folder, unet, vae, text_encoders, tokenizers, scheduler, configs)


def vae_storage(vae_config: dict, dtype):
    """SDXL's VAE overflows in fp16: its config says `force_upcast`, and it stays in fp32."""
    import torch

    return torch.float32 if vae_config.get("force_upcast", False) else dtype


def load_sd_model(base_model: Path, model_config: Path | None = None, prediction_type: str = "auto",
                  dtype: Any = None) -> SDModel:
    """The model of a single file or a diffusers folder, its weights in `dtype` (default fp32; the VAE
    as `vae_storage` says) as they are read: no copy in the file's type is kept on the way."""
    base_model = Path(base_model)
    if base_model.is_dir():
        return load_diffusers_folder(base_model, prediction_type, dtype)
    return load_single_file(base_model, model_config, prediction_type, dtype)
