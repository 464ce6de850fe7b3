"""The hosts' LoRA loading rules, restated from their sources for tests (no host code is copied or run).

AUTOMATIC1111 (extensions-builtin/Lora, networks.py `load_network` and `convert_diffusers_name_to_compvis`,
network_lora/network_hada/network_lokr.py, Forge keeps the same loader for kohya names):
  - A key is split at its first "."; the left part is the module name, the rest the weight part.
  - The model's layers are named after their module paths with "." -> "_": the UNet's
    `diffusion_model_...` (LDM names), SD1's text encoder `transformer_text_model_...`, SD2's
    `model_transformer_resblocks_...`, SDXL's two encoders `0_transformer_text_model_...` and
    `1_model_transformer_resblocks_...`.
  - The module name is converted: `lora_unet_down_blocks_I_(attentions|resnets)_J_X` ->
    `diffusion_model_input_blocks_{1+3I+J}_{1|0}_X` (resnet parts renamed conv1->in_layers_2,
    conv2->out_layers_3, time_emb_proj->emb_layers_1, conv_shortcut->skip_connection),
    `lora_unet_mid_block_(attentions|resnets)_J_X` -> `diffusion_model_middle_block_{1|2J}_X`,
    `lora_unet_up_blocks_I_(attentions|resnets)_J_X` -> `diffusion_model_output_blocks_{3I+J}_{1|0}_X`,
    `lora_unet_down_blocks_I_downsamplers_0_conv` -> `diffusion_model_input_blocks_{3+3I}_0_op`,
    `lora_unet_up_blocks_I_upsamplers_0_conv` -> `diffusion_model_output_blocks_{2+3I}_{2 if I>0 else 1}_conv`,
    `lora_te_text_model_encoder_layers_N_X` -> `transformer_text_model_encoder_layers_N_X` (SD1) or
    `model_transformer_resblocks_N_X'` with mlp_fc1->mlp_c_fc, mlp_fc2->mlp_c_proj, self_attn->attn (SD2),
    `lora_te2_text_model_encoder_layers_N_X` -> `1_model_transformer_resblocks_N_X'` (same renames).
  - Not found: a name ending in `_q_proj`/`_k_proj`/`_v_proj` is looked up without it (the fused
    attention module); then `lora_unet` -> `diffusion_model` (LDM-named SDXL files), then
    `lora_te1_text_model` -> `0_transformer_text_model`, then -> `transformer_text_model`.
  - A module's weights make a LoRA when it has lora_up.weight and lora_down.weight, a LoHa when it has
    all of hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b, a LoKr when it has (lokr_w1 or lokr_w1_a and
    _b) and (lokr_w2 or lokr_w2_a and _b). alpha is read with .item().

ComfyUI (comfy/lora.py `model_lora_keys_unet`, `model_lora_keys_clip`, `load_lora`; comfy/weight_adapter):
  - UNet: every weight `diffusion_model.P.weight` maps from `lora_unet_` + P with "." -> "_" (LDM names),
    and every diffusers UNet weight maps from `lora_unet_` + its diffusers name with "." -> "_".
  - CLIP (kept in the HF layout, also for OpenCLIP encoders): for each layer b < 32 and each of mlp.fc1,
    mlp.fc2, self_attn.{q,k,v,out}_proj: `lora_te_text_model_encoder_layers_{b}_{name with _}` and
    `lora_te1_...` map to clip_l (SD1) / clip_h (SD2); for SDXL `lora_te1_` -> clip_l, `lora_te2_` -> clip_g.
  - For each mapped module, `.alpha` and `.dora_scale` are taken, then the first adapter that loads:
    LoRA (lora_up.weight/lora_down.weight), LoHa (needs hada_w1_a; takes the four hada_w* and
    hada_t1/hada_t2), LoKr (any of lokr_w1, lokr_w2, lokr_w1_a, lokr_w2_a; takes all lokr_*). Every
    key not taken is logged "lora key not loaded".
  - Weight changes (calculate_weight): LoRA up@down * alpha/rank (rank = down.shape[0]); LoHa
    (w1a@w1b) * (w2a@w2b) (or the Tucker rebuild einsum("i j k l, j r, i p -> p r k l", t, w_b, w_a))
    * alpha/w1b.shape[0]; LoKr kron(w1, w2) (w1 = lokr_w1 or w1_a@w1_b, w2 = lokr_w2, w2_a@w2_b or its
    Tucker rebuild; w1 unsqueezed twice when w2 is 4-D) * alpha/dim where dim = w2_b.shape[0], else
    w1_b.shape[0], else no scale. Each reshaped to the weight's shape and added times the strength.
"""

from __future__ import annotations

import re

import torch

_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
           "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}
_CLIP_NAMES = ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj")


def _module_names(checkpoint_keys) -> set[str]:
    """Module paths of an LDM checkpoint: each weight's key without its last part."""
    return {k.rsplit(".", 1)[0] for k in checkpoint_keys if "." in k}


# --- AUTOMATIC1111 -------------------------------------------------------------------------------


def a1111_layers(checkpoint_keys, arch: str) -> set[str]:
    """A1111's `network_layer_mapping` names for a checkpoint with these keys."""
    out = set()
    for module in _module_names(checkpoint_keys):
        if module.startswith("model.diffusion_model."):
            out.add(module.removeprefix("model.").replace(".", "_"))
        elif arch == "sdxl" and module.startswith("conditioner.embedders."):
            i, rest = module.removeprefix("conditioner.embedders.").split(".", 1)
            out.add(f"{i}_" + rest.replace(".", "_"))
        elif module.startswith("cond_stage_model."):
            out.add(module.removeprefix("cond_stage_model.").replace(".", "_"))
    return out


def _openclip_suffix(rest: str) -> str:
    if "mlp_fc1" in rest:
        return rest.replace("mlp_fc1", "mlp_c_fc")
    if "mlp_fc2" in rest:
        return rest.replace("mlp_fc2", "mlp_c_proj")
    return rest.replace("self_attn", "attn")


def a1111_convert(key: str, arch: str) -> str:
    m = re.match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        rest = _RESNET.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_input_blocks_{1 + i * 3 + j}_{1 if kind == 'attentions' else 0}_{rest}"
    m = re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3]
        rest = _RESNET.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_middle_block_{1 if kind == 'attentions' else j * 2}_{rest}"
    m = re.match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        rest = _RESNET.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_output_blocks_{i * 3 + j}_{1 if kind == 'attentions' else 0}_{rest}"
    m = re.match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", key)
    if m:
        return f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"
    m = re.match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", key)
    if m:
        i = int(m[1])
        return f"diffusion_model_output_blocks_{2 + i * 3}_{2 if i > 0 else 1}_conv"
    m = re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key)
    if m:
        if arch == "sd2":
            return f"model_transformer_resblocks_{m[1]}_{_openclip_suffix(m[2])}"
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    m = re.match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", key)
    if m:
        return f"1_model_transformer_resblocks_{m[1]}_{_openclip_suffix(m[2])}"
    return key


def a1111_resolve(module_key: str, layers: set[str], arch: str) -> str | None:
    """The layer A1111 applies this file module to, or None (the key is not matched)."""
    key = a1111_convert(module_key, arch)
    if key in layers:
        return key
    m = re.match(r"(.*)_([qkv]_proj)$", key)
    if m and m[1] in layers:
        return m[1]
    if "lora_unet" in module_key:
        key = module_key.replace("lora_unet", "diffusion_model")
        return key if key in layers else None
    if "lora_te1_text_model" in module_key:
        for new in ("0_transformer_text_model", "transformer_text_model"):
            key = module_key.replace("lora_te1_text_model", new)
            if key in layers:
                return key
    return None


def a1111_module_type(parts) -> str | None:
    parts = set(parts)
    if {"lora_up.weight", "lora_down.weight"} <= parts:
        return "lora"
    if {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= parts:
        return "loha"
    has_1 = "lokr_w1" in parts or {"lokr_w1_a", "lokr_w1_b"} <= parts
    has_2 = "lokr_w2" in parts or {"lokr_w2_a", "lokr_w2_b"} <= parts
    return "lokr" if has_1 and has_2 else None


def a1111_unmatched(tensors: dict, checkpoint_keys, arch: str) -> list[str]:
    """Keys A1111 would not match to a layer, or whose module no network type accepts."""
    layers = a1111_layers(checkpoint_keys, arch)
    grouped: dict[str, set] = {}
    bad = []
    for key in tensors:
        module, _, part = key.partition(".")
        if a1111_resolve(module, layers, arch) is None:
            bad.append(key)
        grouped.setdefault(module, set()).add(part)
    bad += [m for m, parts in grouped.items() if a1111_module_type(parts) is None]
    return bad


# --- ComfyUI ---------------------------------------------------------------------------------------


def comfy_diffusers_to_ldm(name: str, layers_per_block: int = 2) -> str | None:
    """comfy.utils.unet_to_diffusers, restated for the module kinds LoRAs target."""
    n = layers_per_block + 1
    resnet = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
              "conv_shortcut": "skip_connection"}
    m = re.match(r"down_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.+)", name)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        rest = resnet.get(rest, rest) if kind == "resnets" else rest
        return f"input_blocks.{1 + i * n + j}.{1 if kind == 'attentions' else 0}.{rest}"
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", name)
    if m:
        return f"input_blocks.{(int(m[1]) + 1) * n}.0.op"
    m = re.match(r"mid_block\.(attentions|resnets)\.(\d+)\.(.+)", name)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3]
        rest = resnet.get(rest, rest) if kind == "resnets" else rest
        return f"middle_block.{1 if kind == 'attentions' else 2 * j}.{rest}"
    m = re.match(r"up_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.+)", name)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        rest = resnet.get(rest, rest) if kind == "resnets" else rest
        return f"output_blocks.{i * n + j}.{1 if kind == 'attentions' else 0}.{rest}"
    return None


def comfy_key_map(checkpoint_keys, arch: str, unet_diffusers_names, has_attention_up) -> dict[str, tuple]:
    """LoRA module name -> (the checkpoint weight ComfyUI patches, q/k/v third or None).

    ComfyUI keeps OpenCLIP encoders in the HF layout; their q/k/v weights are the thirds of the
    checkpoint's fused in_proj_weight, which is where the test applies them."""
    keys = set(checkpoint_keys)
    out: dict[str, tuple] = {}
    for k in keys:
        if k.startswith("model.diffusion_model.") and k.endswith(".weight"):
            out["lora_unet_" + k[len("model.diffusion_model."):-len(".weight")].replace(".", "_")] = (k, None)
    for name in unet_diffusers_names:
        ldm = comfy_diffusers_to_ldm(name)
        if ldm is None:
            up = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", name)
            if not up:
                continue
            i = int(up[1])
            ldm = f"output_blocks.{i * 3 + 2}.{2 if has_attention_up(i) else 1}.conv"
        key = f"model.diffusion_model.{ldm}.weight"
        if key in keys:
            out["lora_unet_" + name.replace(".", "_")] = (key, None)

    def clip(prefix: str, lora_prefixes: list[str], open_clip: bool):
        for b in range(32):
            for c in _CLIP_NAMES:
                if open_clip:
                    layer = f"{prefix}transformer.resblocks.{b}."
                    qkv = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}
                    other = {"mlp.fc1": "mlp.c_fc.weight", "mlp.fc2": "mlp.c_proj.weight",
                             "self_attn.out_proj": "attn.out_proj.weight"}
                    target = (layer + "attn.in_proj_weight", qkv[c]) if c in qkv else (layer + other[c], None)
                else:
                    target = (f"{prefix}text_model.encoder.layers.{b}.{c}.weight", None)
                if target[0] not in keys:
                    continue
                for lp in lora_prefixes:
                    out[f"{lp}_text_model_encoder_layers_{b}_{c.replace('.', '_')}"] = target

    if arch == "sdxl":
        clip("conditioner.embedders.0.transformer.", ["lora_te1"], False)
        clip("conditioner.embedders.1.model.", ["lora_te2"], True)
    elif arch == "sd2":
        clip("cond_stage_model.model.", ["lora_te", "lora_te1"], True)
    else:
        clip("cond_stage_model.transformer.", ["lora_te", "lora_te1"], False)
    return out


def comfy_unloaded(tensors: dict, key_map: dict) -> list[str]:
    """Keys ComfyUI's load_lora leaves unloaded (what it logs as "lora key not loaded")."""
    loaded = set()
    modules = {k.partition(".")[0] for k in tensors}
    for x in modules:
        if x not in key_map:
            continue
        for extra in ("alpha", "dora_scale"):
            if f"{x}.{extra}" in tensors:
                loaded.add(f"{x}.{extra}")
        if f"{x}.lora_up.weight" in tensors:
            loaded |= {f"{x}.lora_up.weight", f"{x}.lora_down.weight"}
        elif f"{x}.hada_w1_a" in tensors:
            loaded |= {f"{x}.{p}" for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
                       if f"{x}.{p}" in tensors}
        elif any(f"{x}.{p}" in tensors for p in ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w2_a")):
            loaded |= {f"{x}.{p}" for p in ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b",
                                            "lokr_t2") if f"{x}.{p}" in tensors}
    return sorted(set(tensors) - loaded)


def comfy_delta(parts: dict, shape) -> torch.Tensor:
    """calculate_weight's weight change at strength 1."""
    f = {k: v.float() for k, v in parts.items()}
    alpha = f["alpha"].item() if "alpha" in f else None
    if "lora_up.weight" in f:
        up, down = f["lora_up.weight"], f["lora_down.weight"]
        scale = alpha / down.shape[0] if alpha is not None else 1.0
        return (up.flatten(1) @ down.flatten(1)).reshape(shape) * scale
    if "hada_w1_a" in f:
        if "hada_t1" in f:
            m1 = torch.einsum("i j k l, j r, i p -> p r k l", f["hada_t1"], f["hada_w1_b"], f["hada_w1_a"])
            m2 = torch.einsum("i j k l, j r, i p -> p r k l", f["hada_t2"], f["hada_w2_b"], f["hada_w2_a"])
        else:
            m1, m2 = f["hada_w1_a"] @ f["hada_w1_b"], f["hada_w2_a"] @ f["hada_w2_b"]
        scale = alpha / f["hada_w1_b"].shape[0] if alpha is not None else 1.0
        return (m1 * m2).reshape(shape) * scale
    dim = None
    if "lokr_w1" in f:
        w1 = f["lokr_w1"]
    else:
        dim = f["lokr_w1_b"].shape[0]
        w1 = f["lokr_w1_a"] @ f["lokr_w1_b"]
    if "lokr_w2" in f:
        w2 = f["lokr_w2"]
    else:
        dim = f["lokr_w2_b"].shape[0]
        if "lokr_t2" in f:
            w2 = torch.einsum("i j k l, j r, i p -> p r k l", f["lokr_t2"], f["lokr_w2_b"], f["lokr_w2_a"])
        else:
            w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
    if w2.dim() == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    return torch.kron(w1, w2).reshape(shape) * scale


def comfy_apply(checkpoint: dict, tensors: dict, key_map: dict, strength: float = 1.0) -> dict:
    """A copy of the checkpoint with every module of the file applied, as ComfyUI patches weights."""
    out = dict(checkpoint)
    grouped: dict[str, dict] = {}
    for key, tensor in tensors.items():
        module, _, part = key.partition(".")
        grouped.setdefault(module, {})[part] = tensor
    for module, parts in grouped.items():
        weight_key, third = key_map[module]
        weight = out[weight_key].clone().float()
        if third is None:
            weight += strength * comfy_delta(parts, weight.shape)
        else:
            n = weight.shape[0] // 3
            weight[third * n : (third + 1) * n] += strength * comfy_delta(parts, (n, weight.shape[1]))
        out[weight_key] = weight.to(checkpoint[weight_key].dtype)
    return out
