"""`lora convert`: kohya <-> diffusers/PEFT naming of SD LoRAs.

kohya -> diffusers: diffusers' own readers do the renaming: `lora_state_dict` (kohya and SDXL's LDM
names to diffusers modules), `convert_unet_state_dict_to_peft` / `convert_state_dict_to_diffusers` +
`convert_state_dict_to_peft`, and `get_peft_kwargs` for the LoRA config (rank and lora_alpha per
module), which is written as diffusers' `lora_adapter_metadata` header so `load_lora_weights` scales
the file as the hosts scale the kohya one.

diffusers -> kohya: `convert_state_dict_to_kohya`, around three known pitfalls: it needs `unet.`
prefixed keys, writes the rank into `.alpha` (we write lora_alpha from the header; a file without
one follows the diffusers convention alpha = rank), and names SD1/SD2 text encoders `lora_te1_`
(we write `lora_te_`) with whatever module names it was given (transformers 5 CLIP names lack
`text_model.`, which the hosts need: it is put back). SDXL UNet modules get their LDM names.
DoRA, LoHa and LoKr files are refused: their kohya and PEFT layouts do not carry the same thing.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from shared.sd.lora_file import LoraFile, LoraFileError, read_lora
from shared.sd.lora_tools.output import output_place, publish_checkpoint, publish_lora

METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@dataclass
class ConvertResult:
    path: Path
    layout: str
    modules: int

    def summary(self) -> str:
        return f"converted {self.modules} modules to the {self.layout} layout; wrote {self.path}"


def _pipeline(arch: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline


def kohya_to_diffusers(lora: LoraFile, unet_config: dict) -> tuple[dict, dict]:
    """(tensors with unet./text_encoder./text_encoder_2. PEFT keys, LoRA config per component)."""
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )
    from diffusers.utils.peft_utils import get_peft_kwargs

    other = sorted({m.kind for m in lora.modules.values()} - {"lora", "locon"})
    if other or lora.is_dora:
        raise LoraFileError(f"{lora.path}: a {lora.lora_type()} file; the diffusers layout here is for LoRA/LoCon "
                            "(up/down) files only")
    state, alphas = _pipeline(lora.arch()).lora_state_dict(dict(lora.tensors), unet_config=unet_config)
    alphas = alphas or {}
    out, configs = {}, {}
    for component in COMPONENTS:
        part = {k.removeprefix(component + "."): v for k, v in state.items() if k.split(".", 1)[0] == component}
        if not part:
            continue
        unet = component == "unet"
        peft = convert_unet_state_dict_to_peft(part) if unet else convert_state_dict_to_peft(
            convert_state_dict_to_diffusers(part))
        if not unet:  # module names as a transformers 5 CLIPTextModel has them (and PEFT matches by suffix)
            peft = {k.removeprefix("text_model."): v for k, v in peft.items()}
        if unet:
            ranks = {f"^{k}": v.shape[1] for k, v in peft.items() if "lora_B" in k and v.ndim > 1}
        else:
            ranks = {k: v.shape[1] for k, v in peft.items() if "lora_B" in k and v.ndim > 1}
        own = {k.removeprefix(component + "."): v for k, v in alphas.items() if k.split(".", 1)[0] == component}
        kwargs = get_peft_kwargs(ranks, own, peft, is_unet=unet)
        configs[component] = {k: (sorted(v) if isinstance(v, set) else v) for k, v in kwargs.items()}
        out.update({f"{component}.{k}": v for k, v in peft.items()})
    return out, configs


def _alpha_for(module: str, config: dict, rank: int) -> float:
    """PEFT's rule: an alpha_pattern key matches a module whose name ends with it (regex)."""
    if not config:
        return float(rank)  # no config: diffusers' convention, scale 1
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern.lstrip('^')})$", module):
            return float(alpha)
    return float(config.get("lora_alpha", rank))


def diffusers_to_kohya(tensors: dict, metadata: dict[str, str], arch: str, unet_config: dict) -> dict:
    """kohya tensors (our export's names) of a diffusers-layout LoRA."""
    import torch
    from diffusers.utils import convert_state_dict_to_kohya

    from shared.sd.kohya_export import text_encoder_module_name
    from shared.sd.ldm_layout import unet_map

    try:
        flat = json.loads(metadata.get(METADATA_KEY, "") or "{}")
    except ValueError:
        flat = {}
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, field = key.partition(".")
        configs.setdefault(component, {})[field] = value
    to_ldm = unet_map(unet_config).to_ldm if arch == "sdxl" else None
    peft, alphas = {}, {}
    for key, tensor in tensors.items():
        component, _, rest = key.partition(".")
        if component not in COMPONENTS or (".lora_A." not in rest and ".lora_B." not in rest):
            raise LoraFileError(f"key {key!r} is not a diffusers LoRA key (<unet|text_encoder|text_encoder_2>."
                                "<module>.lora_A/lora_B.weight)")
        module, ab, tail = re.split(r"\.(lora_[AB])\.", rest, maxsplit=1)
        if component == "unet":
            name = to_ldm(module) if to_ldm else module
        else:
            name = text_encoder_module_name(module)
        peft[f"{component}.{name}.{ab}.{tail}"] = tensor
        if ab == "lora_A":
            alphas[(component, name)] = _alpha_for(module, configs.get(component, {}), int(tensor.shape[0]))
    kohya = convert_state_dict_to_kohya(peft)
    out = {}
    te_prefix = {"text_encoder": "lora_te1" if arch == "sdxl" else "lora_te", "text_encoder_2": "lora_te2"}
    names = {}
    for (component, name), alpha in alphas.items():
        prefix = "lora_unet" if component == "unet" else te_prefix[component]
        names[(component, name)] = (prefix + "_" + name.replace(".", "_"), alpha)
    for key, tensor in kohya.items():
        module, _, part = key.partition(".")
        if part == "alpha":
            continue  # the rank, written by the converter: replaced below
        if arch != "sdxl" and module.startswith("lora_te1_"):
            module = "lora_te_" + module.removeprefix("lora_te1_")
        out[f"{module}.{part}"] = tensor
    for module, alpha in names.values():
        if f"{module}.lora_down.weight" not in out:
            raise LoraFileError(f"diffusers' converter named a module other than {module}; cannot place its alpha")
        out[f"{module}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
    return out


def _diffusers_family(tensors: dict) -> str:
    """sdxl (two text encoders or SDXL's add_embedding), sd2 (a 1024-wide text encoder), else sd1."""
    if any(k.startswith(("text_encoder_2.", "unet.add_embedding.")) for k in tensors):
        return "sdxl"
    for key, tensor in tensors.items():
        if key.startswith("text_encoder.") and ".lora_A." in key:
            return "sd2" if tensor.shape[1] == 1024 else "sd1"
    return "sd1"


def convert_lora(path: Path, *, to: str, out_dir: Path | None = None, name: str | None = None,
                 arch: str | None = None, model_config: Path | None = None) -> ConvertResult:
    """Write the LoRA at `path` in the other layout (`to`: diffusers or kohya)."""
    from shared.sd.lora_names import configs_for, meta_components

    if to not in ("diffusers", "kohya"):
        raise LoraFileError(f"convert: --to must be diffusers or kohya, got {to!r}")
    lora = read_lora(path)
    if lora.layout == to:
        raise LoraFileError(f"{lora.path}: already in the {to} layout")
    if to == "diffusers":
        family = arch or lora.arch()
        unet_config = meta_components(family, configs_for(family, model_config))[0].config  # with defaults
        tensors, configs = kohya_to_diffusers(lora, unet_config)
        meta = {"format": "pt", METADATA_KEY: json.dumps({f"{c}.{k}": v for c, cfg in configs.items()
                                                          for k, v in cfg.items()}, indent=2, sort_keys=True)}
        folder, stem = output_place(lora.path, out_dir, name, f"{lora.path.stem}-diffusers")
        written = publish_checkpoint(folder, stem, tensors, meta)
        return ConvertResult(written, to, len({k.rsplit(".lora_", 1)[0] for k in tensors}))
    family = arch or _diffusers_family(lora.tensors)
    unet_config = dict(meta_components(family, configs_for(family, model_config))[0].config)
    tensors = diffusers_to_kohya(lora.tensors, lora.metadata, family, unet_config)
    from shared.sd.base_model import ARCHITECTURES

    spec = ARCHITECTURES[family]
    meta = {"ss_network_module": "networks.lora", "ss_base_model_version": spec["ss_base_model_version"],
            "ss_v2": spec["ss_v2"], "modelspec.architecture": spec["modelspec"], "modelspec.sai_model_spec": "1.0.0",
            "modelspec.title": "", "ss_training_comment": f"converted by lora-daemon from {lora.path.name}"}
    folder, stem = output_place(lora.path, out_dir, name, f"{lora.path.stem}-kohya")
    written = publish_lora(folder, stem, tensors, meta)
    return ConvertResult(written, to, len({k.split(".", 1)[0] for k in tensors}))
