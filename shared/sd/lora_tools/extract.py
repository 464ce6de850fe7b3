"""`lora extract`: a LoRA from a fine-tuned checkpoint and its base.

For each of kohya's target modules (the UNet's attention blocks, with `conv_rank` also the ResBlock
and resampler convs, and the text encoders' attention/MLP layers) the difference of the two weights is
factorised by SVD to the chosen rank: up = U_k sqrt(S_k), down = sqrt(S_k) Vh_k, alpha = rank (scale 1).
Modules whose weights differ by less than `min_diff` (largest absolute difference) are left out: a
fine-tune that froze the text encoder gives a UNet-only LoRA. The file is in our export's layout and
metadata (SD1/SD2 diffusers names, SDXL LDM names), so it loads in A1111, Forge and ComfyUI.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared.sd.lora_file import LoraFileError
from shared.sd.lora_tools.output import Progress, no_progress, output_place, publish_lora


@dataclass
class ExtractResult:
    path: Path
    modules: int
    skipped: int
    kept_energy: float

    def summary(self) -> str:
        return (f"extracted {self.modules} modules ({self.skipped} unchanged left out), kept "
                f"{self.kept_energy:.2%} of the difference's energy; wrote {self.path}")


def _weight(state: dict, target, path: Path):
    if target.ldm_key not in state:
        raise LoraFileError(f"{path}: has no {target.ldm_key}; not the same model family as the other checkpoint")
    w = state[target.ldm_key]
    if target.rows is not None:
        n = w.shape[0] // 3
        w = w[target.rows * n : (target.rows + 1) * n]
    return w.float()


def extract_tensors(base_state: dict, tuned_state: dict, targets, *, rank: int, conv_rank: int = 0,
                    min_diff: float = 1e-5, progress: Progress = no_progress, paths=("base", "tuned")):
    """(kohya tensors, modules written, modules skipped, kept energy)."""
    import torch

    from shared.sd.lora_tools.resize import svd_factors

    out, written, skipped, kept, total = {}, 0, 0, 0.0, 0.0
    for i, target in enumerate(targets):
        diff = _weight(tuned_state, target, paths[1]) - _weight(base_state, target, paths[0])
        progress(i + 1, len(targets), target.preferred)
        if diff.abs().max().item() < min_diff:
            skipped += 1
            continue
        conv3 = len(target.shape) == 4 and tuple(target.shape[2:]) != (1, 1)
        k = min(conv_rank if conv3 else rank, *diff.flatten(1).shape)
        up, down, s = svd_factors(diff.flatten(1), k)
        kept += (s[:k] ** 2).sum().item()
        total += (s**2).sum().item()
        if len(target.shape) == 4:
            up, down = up[:, :, None, None], down.reshape(k, *target.shape[1:])
        key = target.preferred
        out[f"{key}.lora_up.weight"] = up.to(torch.float16).contiguous()
        out[f"{key}.lora_down.weight"] = down.to(torch.float16).contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(k), dtype=torch.float16)
        written += 1
    return out, written, skipped, (kept / total if total else 1.0)


def extract_lora(base: Path, tuned: Path, *, rank: int, conv_rank: int = 0, text_encoder: bool = True,
                 min_diff: float = 1e-5, out_dir: Path | None = None, name: str | None = None,
                 model_config: Path | None = None, progress: Progress = no_progress) -> ExtractResult:
    """Write a rank-`rank` LoRA that turns `base` into (an approximation of) `tuned`."""
    from shared.sd.base_model import ARCHITECTURES, detect_architecture, read_checkpoint
    from shared.sd.kohya_export import lora_metadata
    from shared.sd.lora_names import configs_for, kohya_target_modules

    if rank < 1:
        raise LoraFileError(f"extract: --rank must be at least 1, got {rank}")
    if conv_rank < 0:
        raise LoraFileError(f"extract: --conv-rank may not be negative, got {conv_rank}")
    base, tuned = Path(base), Path(tuned)
    base_state, tuned_state = read_checkpoint(base), read_checkpoint(tuned)
    arch = detect_architecture(base_state, base)
    if detect_architecture(tuned_state, tuned) != arch:
        raise LoraFileError(f"{tuned}: not the same model family as {base} ({arch})")
    configs = configs_for(arch, model_config)
    targets = kohya_target_modules(arch, configs, conv=conv_rank > 0, text_encoders=text_encoder)
    tensors, written, skipped, kept = extract_tensors(base_state, tuned_state, targets, rank=rank,
                                                      conv_rank=conv_rank, min_diff=min_diff, progress=progress,
                                                      paths=(base, tuned))
    if not written:
        raise LoraFileError(f"{tuned}: no target weight differs from {base} by {min_diff} or more; nothing to extract")
    folder, stem = output_place(tuned, out_dir, name, f"{tuned.stem}-lora")
    family = arch
    if arch == "sd2":
        from shared.sd.base_model import detect_prediction_type

        family = "sd2_v" if detect_prediction_type(tuned_state, arch) == "v_prediction" else "sd2"
    assert family in ARCHITECTURES
    training = {"ss_training_comment": f"extracted by lora-daemon from {tuned.name} minus {base.name}",
                "ss_network_train_unet_only": str(not any(k.startswith("lora_te") for k in tensors))}
    if conv_rank:
        training["ss_network_args"] = {"conv_dim": conv_rank, "conv_alpha": conv_rank}
    meta = lora_metadata(arch=family, output_name=stem, rank=rank, alpha=rank, base_model=base,
                         resolution=1024 if arch == "sdxl" else 512, training=training)
    return ExtractResult(publish_lora(folder, stem, tensors, meta), written, skipped, kept)
