"""The memory levers of a Flux run, resolved from the card's memory when set to auto.

Estimates for FLUX.1-dev LoRA training at 1024 px, batch 1, rank 16, with cached latents and text
outputs (T5 and the autoencoder are then off the card): the bf16 transformer alone is 23.8 GB, its fp8
copy 11.9 GB; activations with gradient checkpointing add about 2-4 GB; every swapped block frees
about 0.28 GB (a single block, 142M weights, in bf16; the last 38 blocks swapped are single blocks)
or 0.68 GB (a double block, 340M weights), half that in fp8. These are estimates until benchmarks/gpu/flux_gpu.py has measured them on a lent GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

BF16_TRANSFORMER_GB = 23.8
FP8_TRANSFORMER_GB = 11.9
ACTIVATIONS_GB = 3.0  # with gradient checkpointing, 1024 px, batch 1 (estimate)
LORA_AND_OPTIMIZER_GB = 0.6  # rank 16 on the default targets, AdamW states in fp32 (estimate)
SINGLE_BLOCK_GB = {"bf16": 0.283, "fp8": 0.142}  # 141.6M weights
DOUBLE_BLOCK_GB = {"bf16": 0.680, "fp8": 0.340}  # 339.8M weights
SINGLE_BLOCKS, DOUBLE_BLOCKS = 38, 19


@dataclass(frozen=True)
class MemoryPlan:
    fp8_base: bool
    gradient_checkpointing: bool
    blocks_to_swap: int
    cache_text_encoder_outputs: str  # memory or disk
    estimate_gb: float


def estimate_gb(fp8_base: bool, blocks_to_swap: int, gradient_checkpointing: bool = True) -> float:
    """Estimated peak VRAM of a FLUX.1-dev LoRA step at 1024 px (see the module doc)."""
    base = FP8_TRANSFORMER_GB if fp8_base else BF16_TRANSFORMER_GB
    # BlockSwap takes the last blocks first: the 38 single blocks, then double blocks
    kind = "fp8" if fp8_base else "bf16"
    singles = min(blocks_to_swap, SINGLE_BLOCKS)
    saved = singles * SINGLE_BLOCK_GB[kind] + (blocks_to_swap - singles) * DOUBLE_BLOCK_GB[kind]
    activations = ACTIVATIONS_GB if gradient_checkpointing else 4 * ACTIVATIONS_GB
    return round(base - saved + activations + LORA_AND_OPTIMIZER_GB, 1)


def plan_memory(vram_gb: float | None, *, fp8_base="auto", gradient_checkpointing="auto", blocks_to_swap="auto",
                cache_text_encoder_outputs="auto", max_blocks: int = 57) -> MemoryPlan:
    """Resolve each `auto` lever for a card of `vram_gb` (None: the CPU, where only correctness
    matters): fp8 when bf16 does not fit, checkpointing always on a card, then as many swapped
    blocks as it takes to fit with 10% headroom."""
    on_cpu = vram_gb is None
    ckpt = (not on_cpu) if gradient_checkpointing == "auto" else bool(gradient_checkpointing)
    budget = 0.9 * vram_gb if not on_cpu else float("inf")
    if fp8_base == "auto":
        fp8 = not on_cpu and estimate_gb(False, 0, ckpt) > budget
    else:
        fp8 = bool(fp8_base)
    if blocks_to_swap == "auto":
        swap = 0
        while not on_cpu and swap < max_blocks and estimate_gb(fp8, swap, ckpt) > budget:
            swap += 1
    else:
        swap = int(blocks_to_swap)
    cache = "disk" if cache_text_encoder_outputs == "auto" else cache_text_encoder_outputs
    return MemoryPlan(fp8, ckpt, swap, cache, estimate_gb(fp8, swap, ckpt))


def card_memory_gb(device) -> float | None:
    """The CUDA card's memory in GB, or None (the CPU, and devices whose memory torch does not report)."""
    import torch

    if getattr(device, "type", str(device)) != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory / 2**30


def plan_for(cfg, device, max_blocks: int, fp8_file: bool = False) -> MemoryPlan:
    """The plan of a job: its fp8_base / blocks_to_swap / gradient_checkpointing settings, each `auto`
    resolved for `device` (the estimates assume FLUX.1's size). fp8_base auto is on for a file that
    already stores its blocks in fp8 (kept as they are, bit for bit). gradient_checkpointing false
    means auto here: on a card a Flux step needs it."""
    fp8 = {"auto": "auto", "true": True, "false": False}[cfg.fp8_base]
    if fp8 == "auto" and fp8_file:
        fp8 = True
    swap = "auto" if cfg.blocks_to_swap == "auto" else int(cfg.blocks_to_swap)
    checkpointing = True if cfg.gradient_checkpointing else "auto"
    return plan_memory(card_memory_gb(device), fp8_base=fp8, gradient_checkpointing=checkpointing,
                       blocks_to_swap=swap, max_blocks=max_blocks)
