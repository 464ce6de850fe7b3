"""Where each kohya LoRA module name lands: the diffusers / transformers module and the weight in an
LDM single-file checkpoint.

Built from the model's configs on the meta device (no weights), so any block layout maps. Both UNet
spellings the hosts accept are listed: diffusers names (`lora_unet_down_blocks_0_attentions_0_...`,
what SD1/SD2 files use) and LDM names (`lora_unet_input_blocks_1_1_...`, what SDXL files use); for text
encoders `lora_te_` (SD1/SD2; `lora_te1_` is read as the same encoder, as both hosts do) or
`lora_te1_` / `lora_te2_` (SDXL). OpenCLIP encoders (SD2, SDXL's second) store q/k/v fused in
`attn.in_proj_weight`: a q/k/v module owns one third of its rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared.sd import ldm_layout as L


@dataclass(frozen=True)
class Target:
    component: str  # unet, te1, te2
    module: str  # diffusers (UNet) or transformers (text encoder) module name, with text_model. for CLIP
    ldm_key: str  # the weight's key in an LDM single-file checkpoint
    rows: int | None  # q/k/v third of a fused OpenCLIP in_proj_weight (0, 1, 2), else None
    shape: tuple[int, ...]  # the module's weight shape
    preferred: str  # the kohya module name our exports use for it


@dataclass
class ModuleTable:
    arch: str
    unet_config: dict
    by_key: dict[str, Target]

    def get(self, kohya_module: str) -> Target | None:
        return self.by_key.get(kohya_module)

    def targets(self) -> list[Target]:
        """Each module once, in model order."""
        seen, out = set(), []
        for target in self.by_key.values():
            if target.preferred not in seen:
                seen.add(target.preferred)
                out.append(target)
        return out


def _weight_modules(model) -> list[tuple[str, tuple[int, ...]]]:
    import torch

    return [(name, tuple(m.weight.shape)) for name, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and name]


def meta_components(arch: str, configs: dict):
    """(unet, [text encoders]) with real layouts and no weights."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def clip(config, projection):
        cfg = CLIPTextConfig(**{k: v for k, v in config.items() if k not in ("architectures", "_name_or_path")})
        return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        encoders = [clip(configs["text_encoder"], False)]
        if arch == "sdxl":
            encoders.append(clip(configs["text_encoder_2"], True))
    return unet, encoders


def configs_for(arch: str, model_config: Path | None = None) -> dict:
    from shared.sd.base_model import read_component_configs, shipped_config_dir

    return read_component_configs(Path(model_config) if model_config else shipped_config_dir(arch))


def module_table(arch: str, configs: dict | None = None, components=None) -> ModuleTable:
    """The table for a family (sd1, sd2, sdxl) from its configs (default: the shipped real sizes)."""
    from shared.sd.kohya_export import text_encoder_module_name

    configs = configs or configs_for(arch)
    unet, encoders = components or meta_components(arch, configs)
    unet_map = L.unet_map(dict(unet.config))
    table: dict[str, Target] = {}
    for name, shape in _weight_modules(unet):
        try:
            ldm = unet_map.to_ldm(name)
        except KeyError:
            continue
        diffusers_key = "lora_unet_" + name.replace(".", "_")
        ldm_key_name = "lora_unet_" + ldm.replace(".", "_")
        preferred = ldm_key_name if arch == "sdxl" else diffusers_key
        target = Target("unet", name, L.UNET_PREFIX + ldm + ".weight", None, shape, preferred)
        table.setdefault(diffusers_key, target)
        table.setdefault(ldm_key_name, target)
    if arch == "sdxl":
        prefixes = [("te1", ["lora_te1"], L.SDXL_CLIP_L_PREFIX, False), ("te2", ["lora_te2"], L.OPEN_CLIP_SDXL_PREFIX, True)]
    elif arch == "sd2":
        prefixes = [("te1", ["lora_te", "lora_te1"], L.OPEN_CLIP_SD2_PREFIX, True)]
    else:
        prefixes = [("te1", ["lora_te", "lora_te1"], L.CLIP_L_PREFIX, False)]
    for (component, names, ckpt_prefix, open_clip), encoder in zip(prefixes, encoders):
        for name, shape in _weight_modules(encoder):
            hf = text_encoder_module_name(name)
            if open_clip:
                try:
                    ldm_key, rows = L.open_clip_weight_name(hf, ckpt_prefix)
                except KeyError:
                    continue  # the projection and embeddings carry no kohya LoRA
            else:
                ldm_key, rows = ckpt_prefix + hf + ".weight", None
            target = Target(component, hf, ldm_key, rows, shape, names[0] + "_" + hf.replace(".", "_"))
            for prefix in names:
                table.setdefault(prefix + "_" + hf.replace(".", "_"), target)
    return ModuleTable(arch, dict(unet.config), table)


def kohya_target_modules(arch: str, configs: dict | None = None, *, conv: bool = False,
                         text_encoders: bool = True) -> list[Target]:
    """kohya's default training targets (shared.images.lora) as table entries."""
    from shared.images.lora import kohya_conv_targets, kohya_text_encoder_targets, kohya_unet_targets
    from shared.sd.kohya_export import text_encoder_module_name

    configs = configs or configs_for(arch)
    unet, encoders = meta_components(arch, configs)
    table = module_table(arch, configs, (unet, encoders))
    by_module = {(t.component, t.module): t for t in table.targets()}
    names = [("unet", n) for n in kohya_unet_targets(unet)]
    if conv:
        names += [("unet", n) for n in kohya_conv_targets(unet)]
    if text_encoders:
        for component, encoder in zip(("te1", "te2"), encoders):
            names += [(component, text_encoder_module_name(n)) for n in kohya_text_encoder_targets(encoder)]
    return [by_module[n] for n in names]
