"""What a base model is, read from its header alone (no weights, no torch, never a pickle).

- a Flux.1 file (`.safetensors`): the Black Forest Labs transformer's marker keys, bare (the
  transformer alone, which needs its separate ae/CLIP-L/T5 files) or under ComfyUI's
  `model.diffusion_model.` (the all-in-one checkpoint); dev has `guidance_in`, schnell not; the blocks
  are counted from the names;
- an SD single file (`.safetensors`): the tensor names and shapes in its header give the family (SD1,
  SD2, SDXL; inpainting and refiners are refused by the same rules the loader applies) and the
  downsampling of its own VAE and UNet, hence the resolution multiple;
- a diffusers folder: `model_index.json` (a FluxPipeline: Flux, its transformer/config.json for the
  variant and blocks) and the unet/vae `config.json` files;
- a Transformers folder: `config.json`;
- a `.ckpt` (a pickle, read only by the loader with `weights_only=True`): SD, with the conservative rule
  (a multiple of 64, what the SD1/SD2 UNets need) unless `model_config` describes its structure;
- a GGUF file (llama.cpp's, Ollama's, ComfyUI-GGUF's inference format), or a folder holding only
  GGUF weights: refused with the reason and where to get trainable weights (shared/llm/deploy.py).

The safetensors header is read by hand: the format is 8 bytes (little-endian header length) and a JSON
object naming each tensor's dtype, shape and offsets, and the `safetensors` package opens files only for
a framework (torch, numpy) that the daemon's process never imports.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from shared.errors import ConfigError, ModelError
from shared.gguf_base import refuse_gguf_base
from shared.weight_files import safetensors_header

SD_CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
CONSERVATIVE_MULTIPLE = 64  # SD1/SD2: VAE x8, UNet x8 (SDXL needs 32)
_UNET_DOWN = re.compile(r"model\.diffusion_model\.input_blocks\.\d+\.0\.op\.weight")
_VAE_DOWN = re.compile(r"first_stage_model\.encoder\.down\.\d+\.downsample\.conv\.weight")


@dataclass(frozen=True)
class ModelFamily:
    task: str  # sd, flux or llm
    arch: str  # sd1, sd2, sdxl, sd (not read: a pickle), flux1-dev, flux1-schnell, or the LLM's model_type
    resolution_multiple: int | None  # images must be a multiple of this (SD: VAE x UNet; Flux: VAE x 2)
    how: str  # how it was told, for messages
    layout: str | None = None  # Flux: bfl (the transformer alone), comfy (all-in-one) or diffusers
    blocks: tuple[int, int] | None = None  # Flux: (double, single) transformer blocks
    fp8: bool = False  # Flux: the file stores the blocks' weights in float8_e4m3fn

    @property
    def name(self) -> str:
        names = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "sd": "SD", "flux1-dev": "FLUX.1-dev",
                 "flux1-schnell": "FLUX.1-schnell"}
        return names.get(self.arch, self.arch)

    def describe(self) -> str:
        """"an SD1.x model (its safetensors header)", "a llama language model (its config.json)"."""
        what = f"{self.name} language model" if self.task == "llm" else f"{self.name} model"
        return f"{'an' if what[0] in 'aeiouAEIOS' else 'a'} {what} ({self.how})"


def read_safetensors_header(path: Path, dtypes: dict[str, str] | None = None) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from a .safetensors file's header; ModelError naming the file if it is not one.
    `dtypes`, when given, is filled with {tensor name: dtype} (F16, BF16, F8_E4M3, ...)."""
    path = Path(path)
    try:
        header, _ = safetensors_header(path)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        reason = str(exc) if "header" in str(exc) else type(exc).__name__
        raise ModelError(f"base_model: {path}: not a readable checkpoint ({reason})") from None
    shapes = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        shape = info.get("shape") if isinstance(info, dict) else None
        if not isinstance(shape, list) or not all(isinstance(n, int) for n in shape):
            raise ModelError(f"base_model: {path}: not a readable checkpoint (tensor {name!r:.80} has no shape)")
        shapes[name] = tuple(shape)
        if dtypes is not None:
            dtypes[name] = str(info.get("dtype"))
    return shapes


def _downsampling_multiple(unet_downs: int, vae_downs: int) -> int:
    return 2 ** (unet_downs + vae_downs)


def _from_configs(folder: Path) -> int:
    """The resolution multiple of a diffusers-format config folder (unet/ and vae/ config.json)."""
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
        vae = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
        # diffusers downsamples after every block but the last, in the UNet and the VAE encoder alike
        return _downsampling_multiple(len(unet["down_block_types"]) - 1, len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{folder}: not a diffusers config folder with unet/ and vae/ config.json "
                         f"({type(exc).__name__}: {exc})") from None


FLUX_MULTIPLE = 16  # the Flux autoencoder's x8 times the transformer's 2x2 patches
_FLUX_PREFIXES = {"": "bfl", "model.diffusion_model.": "comfy"}


def _count_blocks(shapes, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in shapes if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def _flux_single_file(shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str]) -> ModelFamily | None:
    """A Flux family from a header's names (the BFL marker keys, bare or under ComfyUI's prefix), else None."""
    from shared.flux.layout import GUIDANCE_MARKER, MARKER_KEYS

    for prefix, layout in _FLUX_PREFIXES.items():
        if all(prefix + k in shapes for k in MARKER_KEYS):
            variant = "dev" if prefix + GUIDANCE_MARKER in shapes else "schnell"
            blocks = (_count_blocks(shapes, prefix + "double_blocks."), _count_blocks(shapes, prefix + "single_blocks."))
            fp8 = dtypes.get(prefix + MARKER_KEYS[0]) == "F8_E4M3"
            return ModelFamily("flux", f"flux1-{variant}", FLUX_MULTIPLE, "its safetensors header", layout, blocks, fp8)
    return None


def _flux_folder(folder: Path) -> ModelFamily:
    try:
        config = json.loads((folder / "transformer" / "config.json").read_text(encoding="utf-8"))
        variant = "dev" if config.get("guidance_embeds") else "schnell"
        blocks = (int(config["num_layers"]), int(config["num_single_layers"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{folder}: a FluxPipeline folder without a readable transformer/config.json "
                         f"({type(exc).__name__}: {exc})") from None
    return ModelFamily("flux", f"flux1-{variant}", FLUX_MULTIPLE, "its diffusers configs", "diffusers", blocks)


def _is_flux_folder(folder: Path) -> bool:
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(index, dict) and index.get("_class_name") == "FluxPipeline"


def _sd_single_file(path: Path, shapes: dict[str, tuple[int, ...]] | None = None) -> ModelFamily:
    from shared.sd.base_model import detect_architecture_from_shapes

    shapes = read_safetensors_header(path) if shapes is None else shapes
    arch = detect_architecture_from_shapes(shapes, path)
    unet_downs = sum(1 for k in shapes if _UNET_DOWN.fullmatch(k))
    vae_downs = sum(1 for k in shapes if _VAE_DOWN.fullmatch(k)) or 3  # a file without its VAE: SD's x8
    return ModelFamily("sd", arch, _downsampling_multiple(unet_downs, vae_downs), "its safetensors header")


def _sd_folder(folder: Path) -> ModelFamily:
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        index = {}
    try:
        channels = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8")).get("in_channels", 4)
    except (OSError, ValueError, AttributeError):
        channels = 4
    if channels != 4:
        raise ModelError(f"{folder}: an inpainting/instruct UNet ({channels} input channels); only text-to-image "
                         "SD1.x/SD2.x/SDXL base models are trained")
    arch = "sdxl" if isinstance(index, dict) and "text_encoder_2" in index else "sd"
    return ModelFamily("sd", arch, _from_configs(folder), "its diffusers configs")


def _llm_folder(folder: Path) -> ModelFamily:
    from shared.llm.model import read_model_config

    data = read_model_config(folder)
    return ModelFamily("llm", str(data.get("model_type") or "Transformers"), None, "its config.json")


def model_family(base_model: Path, model_config: Path | None = None, task: str = "auto") -> ModelFamily:
    """The family of `base_model` from its header or config files. `task` (from the config) may only
    confirm it, or choose SD for a checkpoint file of another suffix."""
    base = Path(base_model)
    refuse_gguf_base(base)  # a GGUF is an inference format, of an LLM or an image model: one line, first
    family = None
    if base.is_file():
        suffix = base.suffix.lower()
        if suffix == ".safetensors":
            dtypes: dict[str, str] = {}
            shapes = read_safetensors_header(base, dtypes)
            family = _flux_single_file(shapes, dtypes) or _sd_single_file(base, shapes)
        elif suffix in SD_CHECKPOINT_SUFFIXES or task == "sd":
            multiple = _from_configs(Path(model_config)) if model_config else CONSERVATIVE_MULTIPLE
            how = "model_config" if model_config else "a pickle is not read before training: the rule every SD UNet meets"
            family = ModelFamily("sd", "sd", multiple, how)
        else:
            raise ConfigError(
                f"base_model: {base} is a file but not a checkpoint (.safetensors or .ckpt); "
                "an LLM base model is a folder with config.json"
            )
    elif _is_flux_folder(base):
        family = _flux_folder(base)
    elif (base / "model_index.json").is_file() or (base / "unet").is_dir():
        family = _sd_folder(base)
    elif (base / "config.json").is_file():
        family = _llm_folder(base)
    if family is None:
        raise ConfigError(
            f"base_model: cannot tell what {base} is: expected an SD checkpoint file, a diffusers folder "
            "(model_index.json) or a Transformers causal-LM folder (config.json); set `task: sd` or `task: llm`"
        )
    if task not in ("auto", family.task):
        what = {"sd": "an SD model", "flux": "a Flux model", "llm": "a Transformers language model"}[family.task]
        raise ConfigError(f"task: {task}, but base_model {base} is {what} ({family.how}); set task: {family.task} "
                          "or auto, or point base_model at the model you meant")
    return family


# What each separate Flux file must hold: a marker weight (any prefix) and, for the autoencoder, its
# 16 latent channels (an SD VAE has 4)
FLUX_FILES = {
    "flux_ae": ("decoder.conv_in.weight", "the Flux autoencoder (ae.safetensors)"),
    "flux_clip_l": ("encoder.layers.0.self_attn.q_proj.weight", "a CLIP-L text encoder (clip_l.safetensors)"),
    "flux_t5xxl": ("encoder.block.0.layer.0.SelfAttention.q.weight", "a T5 encoder (t5xxl_fp16.safetensors)"),
}


def flux_file_problem(key: str, path: Path) -> str | None:
    """Why the file given as `key` (flux_ae, flux_clip_l, flux_t5xxl) is not that part of a Flux model,
    from its header; None when it looks right (or is not a .safetensors file, which only the loader reads)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return None
    marker, what = FLUX_FILES[key]
    try:
        shapes = read_safetensors_header(path)
    except ModelError:
        return f"{key}: {path} is not a readable .safetensors file"
    found = [name for name in shapes if name == marker or name.endswith("." + marker)]
    if not found:
        return f"{key}: {path} is not {what} (no {marker}); check which file you chose"
    if key == "flux_ae" and len(shapes[found[0]]) == 4 and shapes[found[0]][1] != 16:
        return (f"{key}: {path} is a VAE with {shapes[found[0]][1]} latent channels (an SD VAE?), not the Flux "
                "autoencoder (16); use ae.safetensors")
    return None
