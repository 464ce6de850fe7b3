"""The LLM comparison of benchmarks/llm_compare.py on a CUDA GPU at real size: TinyLlama-1.1B's layout
(22 layers, hidden 2048, GQA 32/4 heads; about 1.0 B parameters with the fixture vocabulary), random
weights, rows cut at 512 tokens, batch 8, one epoch of the same rows for every variant:

- HF Trainer + PEFT with its defaults (fp32) and at its best (bf16, group_by_length);
- ours with its defaults (`mixed_precision: auto` resolves to bf16 on a bf16 GPU), ours with
  `mixed_precision: bf16`, and ours packed (sdpa with the block-diagonal mask transformers builds from
  the restarting position ids; flash-attention's varlen path where the `flash_attn` package is installed).

run_gpu.py calls `run`; `--dry-run` there runs the same plan on the CPU with the tiny layout.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks import llm_compare


def plan(dry_run: bool) -> dict:
    if dry_run:
        return dict(size="tiny", rounds=1, batch_size=4, rows=24, device="cpu")
    # 384 rows at batch 8: 48 steps an epoch (about 2 minutes for the five variants on an H100-class card)
    return dict(size="gpu", rounds=1, batch_size=8, rows=384, device="cuda")


def run(workdir: Path, dry_run: bool, model_cache: Path) -> dict:
    return llm_compare.run(workdir / "llm", model_cache=model_cache, **plan(dry_run))


def markdown_rows(llm: dict) -> list[str]:
    """Rows of run_gpu.py's table."""
    out = []
    for row in llm["variants"].values():
        best = row.get("speed_ratio_vs_ref_best")
        out.append(f"| LLaMA {llm['params'] / 1e9:.2f} B | {row['label']} | {row['tokens_per_s']:.0f} trained tokens/s | "
                   f"{row.get('peak_vram_mb') or 0:.0f} | {row['speed_ratio_vs_ref']:.2f}"
                   + (f" (vs HF best {best:.2f})" if best else "") + " |")
    return out
