"""Which layers of a causal LM get LoRA, and wrapping the model with PEFT.

Default targets are every linear layer except the output head, as the leading LLM trainers do
(peft's own default is only q_proj/v_proj for LLaMA-likes; LLaMA-Factory and axolotl take all
linears). The head is found with
`get_output_embeddings()`, and per-architecture names cover heads that method misses. PEFT is used
directly (`get_peft_model`); transformers 5's `add_adapter` needs a peft that does not exist yet.
"""

from __future__ import annotations

import difflib

from shared.errors import ConfigError, ModelError
from shared.llm.dropout import use_fast_dropout

# Output heads and similar non-trainable projections by model_type, beyond get_output_embeddings().
ARCH_EXCLUDED = {
    "chatglm": ["transformer.output_layer"],
    "tinyglm": ["transformer.output_layer"],
    "gpt_neox": ["embed_out"],
}
# Leaf names that are an output head in every architecture that uses them.
HEAD_NAMES = {"lm_head", "output_layer", "embed_out"}


def _linear_types():
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

    types = [nn.Linear, Conv1D]
    try:
        import bitsandbytes as bnb  # 4-bit base layers under QLoRA

        types += [bnb.nn.Linear4bit, bnb.nn.Linear8bitLt]
    except ImportError:
        pass
    return tuple(types)


def linear_layers(model) -> list[str]:
    kinds = _linear_types()
    return [name for name, module in model.named_modules() if name and isinstance(module, kinds)]


def head_names(model) -> set[str]:
    """Module names of the output head(s) of `model`."""
    heads = set()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    excluded = set(ARCH_EXCLUDED.get(model_type, []))
    for name, module in model.named_modules():
        if (out is not None and module is out) or name in excluded or name.rsplit(".", 1)[-1] in HEAD_NAMES:
            heads.add(name)
    return heads


def default_targets(model) -> list[str]:
    """Every linear layer except the output head."""
    heads = head_names(model)
    return [name for name in linear_layers(model) if name not in heads]


def _peft_matches(name: str, target: str) -> bool:
    """peft's rule for a list entry: the full module name, or its dotted suffix."""
    return name == target or name.endswith("." + target)


def resolve_targets(model, requested: list[str] | None) -> list[str]:
    """The full names of the modules that get LoRA: the default set, or those the config names.
    A requested name may be a leaf (`q_proj`), a dotted suffix or a full module name."""
    if not requested:
        targets = default_targets(model)
        if not targets:
            raise ConfigError("target_modules: this model has no linear layers besides its output head")
        return targets
    linear = linear_layers(model)
    all_names = [name for name, _ in model.named_modules() if name]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in linear})
    chosen: list[str] = []
    for target in requested:
        hits = [n for n in linear if _peft_matches(n, target)]
        if hits:
            chosen += [n for n in hits if n not in chosen]
            continue
        if any(_peft_matches(n, target) for n in all_names):
            raise ConfigError(
                f"target_modules: {target!r} is not a linear layer; linear layers here: {', '.join(leaves)}"
            )
        close = difflib.get_close_matches(target, leaves, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"target_modules: no module named {target!r} in this model{hint}; linear layers here: {', '.join(leaves)}"
        )
    return chosen


def peft_target_spec(model, targets: list[str]) -> list[str] | str:
    """What to write into adapter_config.json: the short leaf names when they pick out exactly
    `targets` (readable, and what other tools expect), else an anchored regex of the full names."""
    leaves = sorted({t.rsplit(".", 1)[-1] for t in targets})
    wanted = set(targets)
    names = [name for name, _ in model.named_modules() if name]
    picked = {n for n in names if any(_peft_matches(n, leaf) for leaf in leaves)}
    if picked == wanted:
        return leaves
    return "^(" + "|".join(t.replace(".", r"\.") for t in targets) + ")$"


def add_lora(model, cfg, targets: list[str]):
    """Wrap `model` in a PeftModel with LoRA on `targets`; only LoRA parameters train."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    modules = dict(model.named_modules())
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        init_lora_weights="gaussian" if cfg.lora_init == "gaussian" else True,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        target_modules=peft_target_spec(model, targets),
        # GPT-2's Conv1D stores its weight as [in, out]
        fan_in_fan_out=all(isinstance(modules[t], Conv1D) for t in targets),
    )
    model = get_peft_model(model, config)
    use_fast_dropout(model)  # the same dropout, a cheaper mask on the CPU (shared/llm/dropout.py)
    return model


def enable_gradient_checkpointing(model) -> None:
    """Checkpoint activations without cutting the gradient path into LoRA: non-reentrant
    checkpointing, plus inputs that require grad for models that still use the reentrant kind."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ModelError(
            f"gradient_checkpointing: {type(model).__name__} does not support gradient checkpointing; "
            "set gradient_checkpointing: false"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name in transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()


def trainable_parameters(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]
