"""The LLM task's part of the memory plan (shared/training/memory.py): its levers and its peak by part.

Sizes come from the model folder's config.json: the model is built on the meta device (no weight is
read) and PEFT's target modules give the LoRA's size. The parts:

- `weights`: the frozen model in its storage type (4-bit NF4 with `load_in_4bit`: half a byte a weight
  for the linear layers);
- `autocast`: the compute-type copies autocast makes of the linear weights each step where they are
  stored wider (fp32 on the CPU under bf16);
- `trainable`: the LoRA weights, their gradients and AdamW's state (fp32);
- `activations`: what a step's backward keeps for the widest batch the data can make (the
  `batch_size` longest rows, padded to the longest; `max_seq_len` tokens each where the data is not
  known), per token and layer in elements of the hidden and the MLP width, plus the attention weights
  where the kernel keeps them (where rows differ in length a batch is padded and passes a mask, and
  the CPU's fused kernel then falls back to one that keeps them; with `attention: eager` always: the
  softmax's fp32 output and its copy in the compute type), plus the logits and their loss in
  fp32 (one chunk's, where the loss is chunked);
- `kernels` (CPU): the compiled matmul kernels oneDNN's cache keeps, one per shape: about 30 for
  each batch width the data makes, up to the cache's capacity (64 in an LLM job);
- `heap` (CPU): what glibc's heap keeps beyond the live tensors. Freed activations go back to the
  heap, not to the system, and the next step's tensors, of other widths, fit its holes only in part,
  so the resident peak rises above the live one by a share of the activations (the 53 M benchmark:
  0.86 of them over 24 steps of changing widths; the tiny fixture's equal-length rows less).

The per-token figures are fitted to peaks measured on this CPU (the 53 M LLaMA benchmark layout and the
tiny fixture, with and without gradient checkpointing and LoRA dropout; docs/memory.md); on CUDA they
are estimates until benchmarks/gpu measures them.
"""

from __future__ import annotations

from shared.llm import attention as attention_choice
from shared.llm.attention import EAGER_MAX_WIDTH
from shared.training.memory import (
    Choice,
    Lever,
    MemoryModel,
    checkpointing_lever,
    device_kind,
    dtype_bytes,
    kernel_cache_capacity,
    micro_batch_lever,
    trainable_bytes,
)

# Saved elements per token per decoder layer, fitted (see the module docstring)
HIDDEN = 10.0  # ... of the hidden width (norms, q/k/v after RoPE, attention output, residuals)
MLP = 3.0  # ... of the MLP width (gate, up, their product)
DROPOUT = 1.0  # each LoRA module's dropout copy of its input (and its one-byte mask)
ATTENTION_WEIGHTS = 2.0  # heads x tokens per token and layer, when the attention kernel keeps them
LOGITS = 3.0  # vocabulary-wide fp32 copies per token: the upcast logits, log-softmax, their gradient
CHECKPOINTED = 1.0  # a checkpointed layer keeps its input (hidden width per token)
HEAP = 0.8  # glibc's heap above the live tensors, as a share of the activations (CPU; see the docstring)
# CPU: the compiled matmul kernels oneDNN keeps (shared/training/memory.py cap_kernel_caches), one per
# shape: about 30 for each batch width a step makes (each linear shape's forward and two backward
# products, the LoRA's, attention's), 1.3 MiB a bf16 kernel with its scratch, a tenth of that in fp32
# (measured by widths of one layer, on AVX512-BF16 and on AMX)
KERNELS_PER_WIDTH = 30
KERNEL_BYTES = {2: 1.3 * 2**20, 4: 0.13 * 2**20}


def llm_memory_model(cfg, precision, lengths: list[int] | None = None) -> MemoryModel:
    """The levers and the estimate of an LLM job (see the module docstring). `lengths`: the training
    rows' token counts, longest first (None: every row as long as `max_seq_len`)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from shared.llm.lora import resolve_targets

    device = device_kind(precision.device)
    config = AutoConfig.from_pretrained(str(cfg.base_model), local_files_only=True,
                                        trust_remote_code=cfg.trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    modules = dict(model.named_modules())
    targets = resolve_targets(model, cfg.target_modules)
    lora, lora_inputs = 0, 0
    for name in targets:
        weight = modules[name].weight
        out_features, in_features = weight.shape[0], weight.shape[1]
        if type(modules[name]).__name__ == "Conv1D":  # GPT-2 stores [in, out]
            in_features, out_features = out_features, in_features
        lora += cfg.lora_rank * (in_features + out_features) + (out_features if cfg.use_dora else 0)
        lora_inputs += in_features
    n_params = sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for m in modules.values() if isinstance(m, torch.nn.Linear))
    weight_bytes = dtype_bytes(precision.weight_dtype)
    weights = (linear * 0.5 + (n_params - linear) * 2) if cfg.load_in_4bit else n_params * weight_bytes
    compute = 2 if precision.mixed_precision in ("bf16", "fp16") or cfg.load_in_4bit else 4
    # autocast's compute-type copies of the linear weights, made in the forward and kept for the
    # backward, where the weights are stored wider (fp32 on the CPU under bf16)
    autocast = float(linear * compute) if not cfg.load_in_4bit and compute < weight_bytes else 0.0
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = text.hidden_size
    mlp = getattr(text, "intermediate_size", None) or 4 * hidden
    layers = text.num_hidden_layers
    heads = text.num_attention_heads
    vocab = text.vocab_size
    lora_per_layer = lora_inputs / max(layers, 1)
    dropout = cfg.lora_dropout > 0
    # a loss computed chunk by chunk (shared/llm/loss.py's CHUNK_ELEMENTS, where it has one) holds one
    # chunk's logits at a time
    from shared.llm import loss

    chunk = getattr(loss, "CHUNK_ELEMENTS", None) or float("inf")
    longest = [min(n, cfg.max_seq_len) for n in lengths] if lengths else [cfg.max_seq_len] * cfg.batch_size
    # a batch whose rows all have the same length passes no mask and SDPA's fused kernel keeps no
    # attention weights; a padded one passes a mask, and the kernel that takes it keeps them
    padded = 0 if cfg.packing or len(set(longest)) == 1 else 1
    # eager attention keeps the softmax's fp32 output and (below fp32) its copy in the compute type
    eager_bytes = 4 + (compute if compute < 4 else 0)
    # what the config's `attention` runs here: `auto` (eager for short batches), eager or sdpa
    resolved = attention_choice.resolve(cfg.attention, precision.device, precision.mixed_precision)[0]
    capacity = kernel_cache_capacity()  # plan_memory has set the task's cap by now

    def kept_by(rows: list[int], s, eager: bool) -> float:
        """What a step on `rows` (padded to the first) keeps: the layers' activations and the logits."""
        tokens, width = len(rows) * rows[0], rows[0]
        per_token = HIDDEN * hidden + MLP * mlp + (DROPOUT * lora_per_layer * (1 + 1 / compute) if dropout else 0)
        attention = heads * width * eager_bytes if eager else ATTENTION_WEIGHTS * heads * width * padded * compute
        layer = tokens * (per_token * compute + attention)
        if s["gradient_checkpointing"]:
            kept = tokens * CHECKPOINTED * hidden * compute * layers + layer
        else:
            kept = layer * layers
        return kept + min(tokens * vocab, chunk) * 4 * LOGITS

    def estimate(s) -> dict[str, float]:
        b, mode = s["batch_size"], s.get("attention")
        mode = resolved if mode == cfg.attention else mode  # the config's own choice, as it runs here
        widest = longest[:b]  # the widest batch: the longest rows, padded to the first
        activations = kept_by(widest, s, mode == "eager" or (mode == "auto" and widest[0] <= EAGER_MAX_WIDTH))
        if mode == "auto":  # eager for the batches up to EAGER_MAX_WIDTH wide: the widest of them may keep more
            narrow = [n for n in longest if n <= EAGER_MAX_WIDTH][:b]
            if narrow:
                activations = max(activations, kept_by(narrow, s, True))
        heap = HEAP * activations if device == "cpu" else 0.0  # CUDA: torch's caching allocator, counted as reserved
        return {"weights": float(weights), "autocast": autocast, "trainable": trainable_bytes(lora),
                "activations": activations, "heap": heap, "kernels": kernels(b) if device == "cpu" else 0.0}

    def kernels(b: int) -> float:
        # every batch of the epoch may have its own width: at most one per batch and per row length
        widths = min(-(-len(longest) // b), len(set(longest)))
        return min(capacity, KERNELS_PER_WIDTH * widths) * KERNEL_BYTES[compute]

    levers = [checkpointing_lever(cfg), micro_batch_lever(cfg, device),
              _attention_lever(cfg.attention, resolved)]
    hints = {"weights": "the model's size: load_in_4bit (CUDA) or mixed_precision bf16",
             "activations": "max_seq_len or batch_size, or set gradient_checkpointing: true",
             "heap": "max_seq_len or batch_size, or set gradient_checkpointing: true",
             "trainable": "lora_rank or target_modules"}
    return MemoryModel(levers=levers, estimate=estimate, hints=hints, imports=("peft",))


def _attention_lever(setting: str, resolved: str) -> Lever:
    """`attention`: eager, or `auto`'s eager for short batches (on a bf16 CPU), with sdpa as the leaner
    fallback (the same numbers, to rounding; slower where `auto` chose eager); sdpa alone otherwise."""
    if resolved == "sdpa":
        return Lever("attention", (Choice({"attention": setting}),))
    slower = attention_choice.SDPA_TIME if resolved == "auto" else 1.0
    return Lever("attention", (Choice({"attention": setting}), Choice({"attention": "sdpa"}, slower, "attention: sdpa")))
