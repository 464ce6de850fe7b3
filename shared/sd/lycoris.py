"""LoHa and LoKr (LyCORIS) on kohya's target modules, in the layout AUTOMATIC1111, Forge and ComfyUI load.

The `lycoris-lora` package supplies the modules (`LohaModule`, `LokrModule`: their parameters, init,
forward and the `hada_*` / `lokr_*` tensor names the hosts read). We only choose which modules get one
and name each the kohya way, so a module's `state_dict()` is already the file: kohya module name
(`lora_unet_...`, `lora_te_...`, SDXL's LDM names; see kohya_export) + `.hada_w1_a`, `.hada_w1_b`,
`.hada_w2_a`, `.hada_w2_b` (+ `.hada_t1`/`.hada_t2` on Tucker 3x3 convs), or `.lokr_w1` /
`.lokr_w1_a`+`_b` and `.lokr_w2` / `.lokr_w2_a`+`_b` (+ `.lokr_t2`), and a 0-dim `.alpha`.

The hosts scale LoHa by alpha / rank (rank = `hada_w1_b.shape[0]`) and LoKr by alpha / rank of the
factorised half (`lokr_w2_b`, else `lokr_w1_b`), or by 1 when both halves are full matrices; LyCORIS
trains with the same scale, so what trains is what the hosts apply.

The network is registered on the model as the submodule `lycoris`, so its parameters are the model's
(`model.named_parameters()`, a data-parallel wrapper's gradient sync) while the frozen modules keep
their own names and weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

ALGOS = ("loha", "lokr")
NETWORK_MODULE = "lycoris.kohya"  # what kohya sd-scripts writes for a LyCORIS network (--network_module)
ATTRIBUTE = "lycoris"  # the network's submodule name on the model


@dataclass(frozen=True)
class LycorisSpec:
    """What a LyCORIS network is: the values kohya's `--network_args` carry.

    `factor` (LoKr): split each dimension into a factor near this value and the rest (-1: as close
    to a square root as possible). `decompose_both` (LoKr): factorise the small Kronecker half too.
    `use_tucker`: a Tucker core for 3x3 convs (LoCon targets only; LoHa only, see below)."""

    algo: str
    rank: int
    alpha: float
    conv_rank: int = 0
    conv_alpha: float | None = None
    factor: int = -1
    decompose_both: bool = False
    use_tucker: bool = False
    rank_dropout: float = 0.0
    module_dropout: float = 0.0

    def __post_init__(self):
        if self.algo not in ALGOS:
            raise ValueError(f"lora_type: {self.algo!r} is not a LyCORIS type here (use one of {', '.join(ALGOS)})")
        if self.use_tucker and self.algo == "lokr":
            # ComfyUI rebuilds a Tucker LoKr half with einsum and passes it to torch.kron without making
            # it contiguous; torch.kron refuses such a tensor, and ComfyUI then logs an error and skips
            # the module. LoHa's Tucker cores load everywhere.
            raise ValueError("use_tucker: LoKr with Tucker convs does not load in ComfyUI; use it with loha, "
                             "or turn it off for lokr")

    def network_args(self) -> dict[str, str]:
        """`ss_network_args` as kohya writes it: the `--network_args` values, as strings."""
        args = {"algo": self.algo, "preset": "full"}
        if self.conv_rank:
            args["conv_dim"] = str(self.conv_rank)
            args["conv_alpha"] = _number(self.conv_alpha or self.conv_rank)
        if self.algo == "lokr":
            args["factor"] = str(self.factor)
            if self.decompose_both:
                args["decompose_both"] = "True"
        if self.use_tucker:
            args["use_tucker"] = "True"
        if self.rank_dropout:
            args["rank_dropout"] = _number(self.rank_dropout)
        if self.module_dropout:
            args["module_dropout"] = _number(self.module_dropout)
        return args


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _module_class(algo: str):
    from lycoris import LohaModule, LokrModule

    return {"loha": LohaModule, "lokr": LokrModule}[algo]


def inject_lycoris(model, targets: list[str], spec: LycorisSpec, *, prefix: str, name_map=None,
                   conv_targets: list[str] = (), module_ranks: dict[str, tuple[int, float]] | None = None) -> list:
    """Put a LoHa/LoKr module on exactly the named modules of `model` (diffusers / transformers
    names), named `prefix + "_" + name_map(name)` with dots as underscores; freeze everything else.

    `conv_targets` (LoCon's ResBlock and resampler convs) get `conv_rank` / `conv_alpha`;
    `module_ranks` overrides (rank, alpha) per module name (block_dims). Returns the trainable
    parameters. Call it again on the same model to add more modules (they join one network)."""
    import torch
    from lycoris import LycorisNetwork

    all_targets = list(targets) + [t for t in conv_targets if t not in targets]
    if not all_targets:
        raise ValueError("no LyCORIS target modules")
    modules = dict(model.named_modules())
    missing = [t for t in all_targets if t not in modules]
    if missing:
        raise ValueError(f"no module named {missing[0]!r} in {type(model).__name__}")
    model.requires_grad_(False)
    network = getattr(model, ATTRIBUTE, None)
    if network is None:
        network = LycorisNetwork(torch.nn.Identity(), init_only=True)  # an empty holder; modules added below
    conv_set = set(conv_targets)
    cls = _module_class(spec.algo)
    created = []
    for name in all_targets:
        module = modules[name]
        is_3x3 = isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) != (1, 1)
        rank, alpha = spec.rank, spec.alpha
        if name in conv_set and is_3x3:
            rank, alpha = spec.conv_rank, spec.conv_alpha or spec.conv_rank
        if module_ranks and name in module_ranks:
            rank, alpha = module_ranks[name]
        if rank <= 0:
            continue  # a block set to rank 0 trains nothing there
        key = prefix + "_" + (name_map(name) if name_map else name).replace(".", "_")
        lyco = cls(key, module, 1.0, rank, float(alpha), 0.0, spec.rank_dropout, spec.module_dropout,
                   spec.use_tucker and is_3x3, **({"factor": spec.factor, "decompose_both": spec.decompose_both}
                                                  if spec.algo == "lokr" else {}))
        lyco.to(module.weight.device)  # the frozen layer's device; the adapter stays fp32
        created.append(lyco)
    network.loras = list(getattr(network, "loras", [])) + created
    for lyco in created:
        lyco.apply_to()
        network.add_module(lyco.lora_name, lyco)
    if not hasattr(model, ATTRIBUTE):
        model.add_module(ATTRIBUTE, network)
    params = [p for lyco in created for p in lyco.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def lycoris_network(model):
    """The LyCORIS network on `model`, or None."""
    return getattr(model, ATTRIBUTE, None)


def lycoris_tensors(model) -> dict:
    """The network's tensors under their file keys (fp16, contiguous, CPU): `<kohya module>.<part>`."""
    import torch

    network = lycoris_network(model)
    if network is None:
        return {}
    out = {}
    for key, tensor in network.state_dict().items():
        tensor = tensor.detach()
        if tensor.device.type != "meta":
            tensor = tensor.to("cpu")
        out[key] = tensor.to(torch.float16).contiguous()
    return out


def model_lycoris_tensors(arch: str, unet, text_encoders=()) -> dict:
    """Every LyCORIS tensor of an SD model (UNet and any text encoder that has a network)."""
    out = dict(lycoris_tensors(unet))
    for encoder in text_encoders:
        out.update(lycoris_tensors(encoder))
    return out


def inject_sd(model_unet, text_encoders, arch: str, spec: LycorisSpec, *, conv: bool = False,
              train_text_encoder: bool = False, module_ranks: dict[str, tuple[int, float]] | None = None) -> list:
    """LoHa/LoKr on kohya's default SD targets (the set LoRA uses), named as kohya_export names LoRA.
    Returns the trainable parameters (UNet first)."""
    from shared.images.lora import kohya_conv_targets, kohya_text_encoder_targets, kohya_unet_targets
    from shared.sd.kohya_export import text_encoder_module_name, text_encoder_prefixes, unet_module_name_map

    params = inject_lycoris(model_unet, kohya_unet_targets(model_unet), spec, prefix="lora_unet",
                            name_map=unet_module_name_map(arch, model_unet.config),
                            conv_targets=kohya_conv_targets(model_unet) if conv else (), module_ranks=module_ranks)
    if train_text_encoder:
        for prefix, encoder in zip(text_encoder_prefixes(arch), text_encoders):
            params += inject_lycoris(encoder, kohya_text_encoder_targets(encoder), spec, prefix=prefix,
                                     name_map=text_encoder_module_name)
    return params


def lycoris_metadata(spec: LycorisSpec) -> dict[str, str]:
    """The header keys that differ from a LoRA's (merge over kohya_export.lora_metadata's output)."""
    return {
        "ss_network_module": NETWORK_MODULE,
        "ss_network_dim": str(spec.rank),
        "ss_network_alpha": str(float(spec.alpha)),
        "ss_network_args": json.dumps(spec.network_args()),
    }


def set_lycoris_weight(models, weight: float) -> None:
    """The strength every LyCORIS module applies (1.0 trains; sampling's before/after grid sets others)."""
    for model in models:
        network = lycoris_network(model)
        if network is not None:
            network.set_multiplier(weight)
