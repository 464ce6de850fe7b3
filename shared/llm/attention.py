"""Which attention implementation an LLM job runs: the `attention` setting.

- `sdpa`: torch's scaled_dot_product_attention (transformers' default), or flash-attention 2 on a CUDA
  card computing in bf16/fp16 when the `flash_attn` package is there (`packing.attention_for`).
- `eager`: transformers' own matmul + softmax attention (the model's own code). It keeps the
  attention weights for the backward pass (the softmax's fp32 output and its copy in the compute
  type: heads x width per token and layer, 6 bytes each under bf16), which the fused kernels
  recompute instead. On this project's CPU under bf16 it is the faster one for short rows: torch's CPU
  flash-attention backward runs about four times its forward, where eager's backward is a few small
  matmuls. One layer's attention, forward + backward, 8 heads of 64, batch 4, one core, sdpa against
  eager: 3.6x at 64 tokens a row, 1.9x at 128, 1.35-1.85x at 192-224, 0.8x at 256, 0.5x at 512.
- `auto` (the default): on a CPU under bf16, each forward pass runs eager when its rows are at most
  `EAGER_MAX_WIDTH` tokens and sdpa when they are longer (length-grouped batches differ in width, and
  the wide ones are where eager's weights cost the most memory and save no time); sdpa on every other
  device and type. The memory plan counts the weights eager keeps and goes back to sdpa when they do
  not fit (`shared/llm/memory.py`).
"""

from __future__ import annotations

EAGER_MAX_WIDTH = 192  # tokens a row up to which eager attention trains faster on a bf16 CPU (see above)
# how much longer a job takes with sdpa than with `auto`: the 53 M benchmark, two rounds on an Intel
# CPU with AMX, 1.06x and 1.08x (docs/benchmarks.md; on the AMD CPU eager on every batch was 1.27x)
SDPA_TIME = 1.07


def resolve(setting: str, device, mixed_precision: str) -> tuple[str, str]:
    """(`sdpa`, `eager`, or `auto` where it dispatches by width on this device; the log line)."""
    if setting != "auto":
        return setting, f"attention: {setting}"
    kind = getattr(device, "type", str(device)).split(":")[0]
    if kind != "cpu" or mixed_precision != "bf16":
        return "sdpa", f"attention auto: sdpa (its fused kernels are the faster ones under {mixed_precision} on {kind})"
    return "auto", (f"attention auto: eager for batches of up to {EAGER_MAX_WIDTH} tokens a row, sdpa for longer "
                    "ones (on a bf16 CPU transformers' eager attention trains short rows faster)")


def implementation(chosen: str, device, dtype) -> str | None:
    """transformers' `attn_implementation` to load the model with (None: its default, sdpa)."""
    from shared.llm.packing import attention_for

    return "eager" if chosen == "eager" else attention_for(device, dtype)


def dispatch_by_width(model, max_width: int = EAGER_MAX_WIDTH):
    """`attention: auto` on a bf16 CPU: before each forward pass of `model` (a transformers model that
    follows its AttentionInterface), run eager attention when the rows are at most `max_width` tokens
    and sdpa otherwise, through transformers' own `set_attn_implementation` (under a millisecond a
    switch). Returns the hook's handle; a model that cannot switch is left as it is (None)."""
    if not getattr(model, "_can_set_attn_implementation", lambda: False)():
        return None

    def before(module, args, kwargs):
        rows = kwargs.get("input_ids")
        if rows is None:
            rows = kwargs.get("inputs_embeds", args[0] if args else None)
        if rows is None:
            return
        want = "eager" if rows.shape[1] <= max_width else "sdpa"
        if module.config._attn_implementation != want:
            module.set_attn_implementation(want)

    return model.register_forward_pre_hook(before, with_kwargs=True)
