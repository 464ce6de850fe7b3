"""Reading LoRA files (kohya / LyCORIS layout, or diffusers' PEFT layout) and the weight change each
module makes, computed the way AUTOMATIC1111 and ComfyUI compute it.

A kohya key is `<module>.<part>`: the module name has no dots, the part is `lora_down.weight`,
`lora_up.weight`, `alpha`, `dora_scale`, `hada_w1_a`..., `lokr_w1`... The hosts' arithmetic per type:

- LoRA / LoCon: up @ down (flattened over the kernel), reshaped to the weight, times alpha / rank,
  rank = the down weight's first dimension.
- LoHa: (w1_a @ w1_b) * (w2_a @ w2_b), or with Tucker cores t1/t2 each factor rebuilt as
  einsum("i j k l, j r, i p -> p r k l", t, w_b, w_a); times alpha / rank, rank = hada_w1_b's first dim.
- LoKr: kron(w1, w2) with w1 = lokr_w1 or w1_a @ w1_b, w2 = lokr_w2, w2_a @ w2_b or its Tucker rebuild
  (w1 gets two trailing unit dims when w2 is 4-D); times alpha / rank of the factorised half
  (w2_b's first dim, else w1_b's), or 1 when neither half is factorised.
- No alpha: scale 1. DoRA (`dora_scale`, one magnitude per input column):
  W' = W + strength * ((W + dW) * dora_scale / ||W + dW||_col - W).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from shared.errors import UserError

LORA_PARTS = ("lora_down.weight", "lora_up.weight")
LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
COMMON_PARTS = ("alpha", "dora_scale")
KNOWN_PARTS = set(LORA_PARTS) | set(LOHA_PARTS) | set(LOKR_PARTS) | set(COMMON_PARTS)
PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")


class LoraFileError(UserError):
    """A LoRA file cannot be used as given (one line naming the file and what is wrong)."""


@dataclass
class LoraModule:
    key: str
    parts: dict  # part name -> tensor

    @property
    def kind(self) -> str:
        """lora, locon (a LoRA on a 3x3 conv), loha or lokr."""
        if "hada_w1_a" in self.parts:
            return "loha"
        if any(p.startswith("lokr_") for p in self.parts):
            return "lokr"
        down = self.parts.get("lora_down.weight")
        return "locon" if down is not None and down.dim() == 4 and tuple(down.shape[2:]) != (1, 1) else "lora"

    @property
    def alpha(self) -> float | None:
        alpha = self.parts.get("alpha")
        return None if alpha is None else float(alpha.float().item())

    @property
    def rank(self) -> int | None:
        """The rank the hosts divide alpha by (None: a LoKr of two full matrices)."""
        p = self.parts
        if "lora_down.weight" in p:
            return int(p["lora_down.weight"].shape[0])
        if "hada_w1_b" in p:
            return int(p["hada_w1_b"].shape[0])
        if "lokr_w2_b" in p:
            return int(p["lokr_w2_b"].shape[0])
        if "lokr_w1_b" in p:
            return int(p["lokr_w1_b"].shape[0])
        return None

    @property
    def scale(self) -> float:
        alpha, rank = self.alpha, self.rank
        return alpha / rank if alpha is not None and rank else 1.0


@dataclass
class LoraFile:
    path: Path
    tensors: dict
    metadata: dict[str, str]
    layout: str  # kohya or diffusers
    modules: dict[str, LoraModule] = field(default_factory=dict)

    @property
    def kinds(self) -> Counter:
        return Counter(m.kind for m in self.modules.values())

    @property
    def is_dora(self) -> bool:
        return any("dora_scale" in m.parts for m in self.modules.values())

    def lora_type(self) -> str:
        """LoRA, LoCon, LoHa, LoKr (with +DoRA), or a mix, as a person would name the file."""
        kinds = self.kinds
        if kinds.get("loha") or kinds.get("lokr"):
            names = [n for n, k in (("LoHa", "loha"), ("LoKr", "lokr")) if kinds.get(k)]
            name = "+".join(names)
        else:
            name = "LoCon" if kinds.get("locon") else "LoRA"
        return name + ("+DoRA" if self.is_dora else "")

    def arch(self) -> str:
        """sd1, sd2 or sdxl: from the header when it says, else from the names and widths."""
        version = self.metadata.get("ss_base_model_version", "")
        spec = self.metadata.get("modelspec.architecture", "")
        if version.startswith("sdxl") or spec.startswith("stable-diffusion-xl"):
            return "sdxl"
        if version.startswith("sd_v2") or spec.startswith("stable-diffusion-v2") or self.metadata.get("ss_v2") == "True":
            return "sd2"
        if version.startswith("sd_v1") or spec.startswith("stable-diffusion-v1"):
            return "sd1"
        keys = self.modules
        if any(k.startswith(("lora_te2_", "lora_unet_input_blocks", "lora_unet_output_blocks", "lora_unet_middle_block"))
               for k in keys):
            return "sdxl"
        for key, module in keys.items():  # SD2's OpenCLIP encoder is 1024 wide, SD1's CLIP-L 768
            if key.startswith(("lora_te_", "lora_te1_")) and "lora_down.weight" in module.parts:
                return "sd2" if module.parts["lora_down.weight"].shape[1] == 1024 else "sd1"
        return "sd1"


def read_tensors(path: Path) -> tuple[dict, dict[str, str]]:
    """(tensors, header metadata) of a .safetensors file, or tensors of a .pt/.ckpt (weights only)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise LoraFileError(f"{path}: no such file")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every reader error means "not a usable file"
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        if "Weights only load failed" in str(exc):
            reason = "it holds Python objects besides tensors and was not loaded"
        raise LoraFileError(f"{path}: not a readable LoRA file ({reason})") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        raise LoraFileError(f"{path}: not a LoRA file (no mapping of weight names to tensors inside)")
    return data, {}


def read_lora(path: Path) -> LoraFile:
    """A LoRA file, its modules grouped; a one-line error for anything else."""
    path = Path(path)
    tensors, metadata = read_tensors(path)
    if not tensors:
        raise LoraFileError(f"{path}: holds no tensors")
    if any(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) and (".lora_A." in k or ".lora_B." in k)
           for k in tensors):
        return LoraFile(path, tensors, metadata, "diffusers")
    if any(k.startswith(("model.diffusion_model.", "cond_stage_model.", "conditioner.")) for k in tensors):
        raise LoraFileError(f"{path}: a model checkpoint, not a LoRA (it holds the full UNet weights)")
    modules: dict[str, LoraModule] = {}
    for key, tensor in tensors.items():
        name, dot, part = key.partition(".")
        if not dot or not name.startswith(PREFIXES):
            raise LoraFileError(f"{path}: key {key!r} is not in the kohya layout "
                                f"(<lora_unet_|lora_te_...module>.<part>); not a LoRA for SD1/SD2/SDXL")
        if part not in KNOWN_PARTS:
            raise LoraFileError(f"{path}: key {key!r} has a part ({part!r}) this tool does not read")
        modules.setdefault(name, LoraModule(name, {})).parts[part] = tensor
    for name, module in modules.items():
        p = module.parts
        complete = (all(x in p for x in LORA_PARTS) or all(x in p for x in LOHA_PARTS[:4])
                    or (("lokr_w1" in p or {"lokr_w1_a", "lokr_w1_b"} <= set(p))
                        and ("lokr_w2" in p or {"lokr_w2_a", "lokr_w2_b"} <= set(p))))
        if not complete:
            raise LoraFileError(f"{path}: module {name} is incomplete (has only {', '.join(sorted(p))})")
    return LoraFile(path, tensors, metadata, "kohya", modules)


def _f32(t):
    return t.float()


def _tucker(core, w_b, w_a):
    import torch

    return torch.einsum("i j k l, j r, i p -> p r k l", _f32(core), _f32(w_b), _f32(w_a))


def raw_delta(module: LoraModule, shape: tuple[int, ...]):
    """The module's weight change before its alpha scale, in fp32, shaped like the weight."""
    import torch

    p = module.parts
    kind = module.kind
    if kind in ("lora", "locon"):
        up, down = _f32(p["lora_up.weight"]), _f32(p["lora_down.weight"])
        return (up.flatten(1) @ down.flatten(1)).reshape(shape)
    if kind == "loha":
        if "hada_t1" in p:
            m1 = _tucker(p["hada_t1"], p["hada_w1_b"], p["hada_w1_a"])
            m2 = _tucker(p["hada_t2"], p["hada_w2_b"], p["hada_w2_a"])
        else:
            m1 = _f32(p["hada_w1_a"]) @ _f32(p["hada_w1_b"])
            m2 = _f32(p["hada_w2_a"]) @ _f32(p["hada_w2_b"])
        return (m1 * m2).reshape(shape)
    w1 = _f32(p["lokr_w1"]) if "lokr_w1" in p else _f32(p["lokr_w1_a"]) @ _f32(p["lokr_w1_b"])
    if "lokr_w2" in p:
        w2 = _f32(p["lokr_w2"])
    elif "lokr_t2" in p:
        w2 = _tucker(p["lokr_t2"], p["lokr_w2_b"], p["lokr_w2_a"])
    else:
        w2 = _f32(p["lokr_w2_a"]) @ _f32(p["lokr_w2_b"])
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2.contiguous()).reshape(shape)  # kron refuses einsum's strided output (A1111 too)


def own_shape(module: LoraModule) -> tuple[int, ...] | None:
    """The weight shape the module's tensors imply, or None where only the model knows it (a LoHa or
    LoKr conv without Tucker cores stores the kernel flattened)."""
    p = module.parts
    if "lora_down.weight" in p:
        return (p["lora_up.weight"].shape[0], *p["lora_down.weight"].shape[1:])
    if "hada_t1" in p:
        return (p["hada_w1_a"].shape[1], p["hada_w1_b"].shape[1], *p["hada_t1"].shape[2:])
    if "hada_w1_a" in p:
        return None
    w1 = p["lokr_w1"].shape if "lokr_w1" in p else (p["lokr_w1_a"].shape[0], p["lokr_w1_b"].shape[1])
    if "lokr_w2" in p and p["lokr_w2"].dim() == 4:
        w2 = p["lokr_w2"].shape
        return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])
    return None


def module_delta(module: LoraModule, shape: tuple[int, ...]):
    """dW at strength 1 (alpha scale applied; DoRA is applied by `apply_module`)."""
    try:
        return raw_delta(module, shape) * module.scale
    except RuntimeError as exc:
        raise LoraFileError(f"module {module.key}: its tensors do not fit a weight of shape {tuple(shape)} "
                            f"({str(exc).splitlines()[0][:120]}); a LoRA for another model?") from None


def apply_module(weight, module: LoraModule, strength: float = 1.0):
    """`weight` (any dtype) with the module applied at `strength`, as fp32."""
    from shared.images.dora import column_norm

    w = weight.float()
    delta = module_delta(module, tuple(w.shape))
    magnitude = module.parts.get("dora_scale")
    if magnitude is None:
        return w + strength * delta
    merged = w + delta
    full = merged * (magnitude.float().reshape(column_norm(merged).shape) / column_norm(merged))
    return w + strength * (full - w)


def network_dims(lora: LoraFile) -> tuple[int | None, float | None]:
    """The most common (rank, alpha) over the modules: what `ss_network_dim`/`alpha` state."""
    ranks = Counter(m.rank for m in lora.modules.values() if m.rank)
    alphas = Counter(m.alpha for m in lora.modules.values() if m.alpha is not None)
    return (ranks.most_common(1)[0][0] if ranks else None, alphas.most_common(1)[0][0] if alphas else None)


def network_args(lora: LoraFile) -> dict:
    try:
        value = json.loads(lora.metadata.get("ss_network_args", "") or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
