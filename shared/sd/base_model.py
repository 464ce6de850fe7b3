"""Load an SD base model offline: single-file checkpoints (.safetensors, .ckpt) or diffusers folders.

We do not call `from_single_file`: it needs the hub for configs and silently drops or skips keys
that do not fit (FIELD-NOTES §2). Instead the components are built from shipped (or given) config
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL_CONFIGS = resources.files("shared.sd") / "model_configs"

# Markers of the model families (FIELD-NOTES §2)
SD1_TEXT_KEY = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_TEXT2_PREFIX = "conditioner.embedders.1.model."
UNET_KEY_PREFIX = "model.diffusion_model."

# What A1111/Forge/kohya call each family (ss_base_model_version, modelspec.architecture)
ARCHITECTURES = {
    "sd1": {"ss_base_model_version": "sd_v1", "ss_v2": "False", "modelspec": "stable-diffusion-v1/lora"},
}


@dataclass
class SDModel:
    arch: str
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


def read_checkpoint(path: Path) -> dict:
    """The tensors of a single-file checkpoint. `.ckpt` files are pickles: never unpickle code."""
    import torch

    path = Path(path)
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every reader error means "not a usable checkpoint"
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ModelError(f"{path}: not a readable checkpoint ({reason})") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ModelError(f"{path}: not a checkpoint (no mapping of weight names to tensors inside)")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


def detect_architecture(state_dict: dict, path: Path) -> str:
    if any(k.startswith(SDXL_TEXT2_PREFIX) for k in state_dict):
        raise ModelError(f"{path}: SDXL checkpoints are not supported yet by this build (SD1.x only)")
    if any(k.startswith(SD2_TEXT_PREFIX) for k in state_dict):
        raise ModelError(f"{path}: SD2.x checkpoints are not supported yet by this build (SD1.x only)")
    if SD1_TEXT_KEY in state_dict and any(k.startswith(UNET_KEY_PREFIX) for k in state_dict):
        return "sd1"
    if any(k.startswith(("transformer_blocks.", "double_blocks.", "joint_blocks.")) for k in state_dict):
        raise ModelError(f"{path}: a transformer (Flux/SD3-style) checkpoint; only SD1.x/SD2.x/SDXL UNets are trained")
    raise ModelError(
        f"{path}: not a Stable Diffusion checkpoint (found none of the SD UNet + text encoder weights; "
        f"{len(state_dict)} tensors)"
    )


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
    scheduler = folder / "scheduler" / "scheduler_config.json"
    configs["scheduler"] = _read_json(scheduler) if scheduler.is_file() else {}
    return configs


def _load_strict(module, state_dict: dict, path: Path, component: str) -> None:
    import torch

    expected = module.state_dict()
    # Buffers some files carry and some models do not (CLIP position_ids)
    state_dict = {k: v for k, v in state_dict.items() if k in expected or not k.endswith("position_ids")}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state_dict) if tuple(expected[k].shape) != tuple(state_dict[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} weights missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} of another shape (e.g. {k}: {tuple(state_dict[k].shape)} "
                f"vs {tuple(expected[k].shape)})"
            )
        raise ModelError(
            f"{path}: the {component} does not match its config: {'; '.join(parts)}. "
            "For a model of non-standard size set model_config to its diffusers config folder."
        )
    state_dict = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state_dict.items()}
    module.load_state_dict(state_dict, strict=True, assign=True)


def load_single_file(path: Path, model_config: Path | None = None) -> SDModel:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from shared.sd.tokenizer import clip_tokenizer

    path = Path(path)
    checkpoint = read_checkpoint(path)
    arch = detect_architecture(checkpoint, path)
    config_dir = Path(model_config) if model_config else Path(str(MODEL_CONFIGS / "sd15"))
    configs = read_component_configs(config_dir)

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))

    try:
        unet_sd = convert_ldm_unet_checkpoint(checkpoint, dict(unet.config))
        vae_sd = convert_ldm_vae_checkpoint(checkpoint, dict(vae.config))
    except (KeyError, IndexError, AttributeError) as exc:
        raise ModelError(f"{path}: the UNet/VAE weights do not follow the SD layout ({exc!r})") from None
    text_sd = convert_ldm_clip_checkpoint(checkpoint)
    if not hasattr(text_encoder, "text_model"):  # transformers 5 flattened CLIPTextModel
        text_sd = {k.removeprefix("text_model."): v for k, v in text_sd.items()}

    _load_strict(unet, unet_sd, path, "UNet")
    _load_strict(vae, vae_sd, path, "VAE")
    _load_strict(text_encoder, text_sd, path, "text encoder")

    scheduler = DDPMScheduler.from_config(configs["scheduler"] or json.loads(
        (Path(str(MODEL_CONFIGS / "sd15")) / "scheduler" / "scheduler_config.json").read_text()
    ))
    return SDModel(
        arch=arch,
        source=path,
        unet=unet,
        vae=vae,
        text_encoders=[text_encoder],
        tokenizers=[clip_tokenizer()],
        noise_scheduler=scheduler,
        configs=configs,
    )


def load_diffusers_folder(folder: Path) -> SDModel:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from shared.sd.tokenizer import clip_tokenizer

    folder = Path(folder)
    index = _read_json(folder / "model_index.json")
    if "text_encoder_2" in index:
        raise ModelError(f"{folder}: SDXL diffusers folders are not supported yet by this build (SD1.x only)")
    try:
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{folder}: cannot load the diffusers model ({str(exc).splitlines()[0]})") from None
    if (folder / "tokenizer" / "vocab.json").is_file():
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
    else:
        tokenizer = clip_tokenizer()
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    configs = {"unet": dict(unet.config), "vae": dict(vae.config)}
    return SDModel("sd1", folder, unet, vae, [text_encoder], [tokenizer], scheduler, configs)


def load_sd_model(base_model: Path, model_config: Path | None = None) -> SDModel:
    base_model = Path(base_model)
    if base_model.is_dir():
        return load_diffusers_folder(base_model)
    return load_single_file(base_model, model_config)
