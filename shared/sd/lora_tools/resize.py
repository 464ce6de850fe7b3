"""`lora resize`: a LoRA (or LoCon) to a lower rank by SVD of each module's weight change.

Per module M = up @ down (flattened over the kernel) = U S Vh; keeping k singular values gives
up' = U_k sqrt(S_k), down' = sqrt(S_k) Vh_k and alpha' = alpha * k / rank, so alpha'/k (the scale the
hosts apply) is unchanged and dW' is the best rank-k approximation of dW. The kept energy of a module
is sum(S_k^2) / sum(S^2); the overall figure adds those sums over all modules (the squared Frobenius
norm of every dW, kept over total). `energy` instead of `rank` picks each module's smallest k that
keeps at least that fraction (kohya's "sv_fro" idea). A DoRA magnitude is kept as it is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from shared.sd.lora_file import LoraFileError, read_lora
from shared.sd.lora_tools.output import Progress, no_progress, output_place, publish_lora


@dataclass
class ResizeResult:
    path: Path
    modules: dict[str, tuple[int, int, float]] = field(default_factory=dict)  # key: (old rank, new rank, kept energy)
    kept_energy: float = 1.0

    def summary(self) -> str:
        ranks = sorted({new for _, new, _ in self.modules.values()})
        shown = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
        worst = min(self.modules.items(), key=lambda kv: kv[1][2])
        return (f"{len(self.modules)} modules to rank {shown}: kept {self.kept_energy:.2%} of the energy overall "
                f"(lowest {worst[1][2]:.2%} in {worst[0]}); wrote {self.path}")


def svd_factors(matrix, k: int):
    """(up [out, k], down [k, in], singular values) of the best rank-k factorisation."""
    import torch

    u, s, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    root = s[:k].sqrt()
    return u[:, :k] * root, root[:, None] * vh[:k], s


def rank_for_energy(s, energy: float) -> int:
    import torch

    total = (s**2).sum()
    if total == 0:
        return 1
    kept = torch.cumsum(s**2, 0) / total
    return int(torch.searchsorted(kept, torch.tensor(energy - 1e-7)).item()) + 1


def resize_tensors(lora, *, rank: int | None = None, energy: float | None = None, progress: Progress = no_progress):
    """(new tensors, {module: (old rank, new rank, kept)}, overall kept energy) of a parsed LoRA."""
    import torch

    if (rank is None) == (energy is None):
        raise LoraFileError("resize: give exactly one of --rank or --energy")
    if rank is not None and rank < 1:
        raise LoraFileError(f"resize: --rank must be at least 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise LoraFileError(f"resize: --energy must be in (0, 1], got {energy}")
    if lora.layout != "kohya":
        raise LoraFileError(f"{lora.path}: a diffusers-layout file; convert it to kohya first (lora convert --to kohya)")
    other = sorted({m.kind for m in lora.modules.values()} - {"lora", "locon"})
    if other:
        raise LoraFileError(f"{lora.path}: a {lora.lora_type()} file; resize works on LoRA/LoCon (up/down) modules only")
    tensors, report = {}, {}
    kept_total = energy_total = 0.0
    items = list(lora.modules.items())
    for i, (key, module) in enumerate(items):
        up, down = module.parts["lora_up.weight"], module.parts["lora_down.weight"]
        old = int(down.shape[0])
        matrix = up.float().flatten(1) @ down.float().flatten(1)
        u_k, d_k, s = svd_factors(matrix, old)  # s: every singular value (at most `old` are non-zero)
        k = min(old, rank if rank is not None else rank_for_energy(s, energy))
        up_k, down_k = u_k[:, :k], d_k[:k]
        s2 = (s**2).sum().item()
        kept = (s[:k] ** 2).sum().item()
        kept_total, energy_total = kept_total + kept, energy_total + s2
        alpha = module.alpha if module.alpha is not None else float(old)
        dtype = up.dtype
        tensors[f"{key}.lora_up.weight"] = up_k.reshape(up.shape[0], k, *up.shape[2:]).to(dtype)
        tensors[f"{key}.lora_down.weight"] = down_k.reshape(k, *down.shape[1:]).to(dtype)
        tensors[f"{key}.alpha"] = torch.tensor(alpha * k / old, dtype=module.parts.get("alpha", up).dtype)
        if "dora_scale" in module.parts:
            tensors[f"{key}.dora_scale"] = module.parts["dora_scale"]
        report[key] = (old, k, kept / s2 if s2 else 1.0)
        progress(i + 1, len(items), key)
    return tensors, report, (kept_total / energy_total if energy_total else 1.0)


def resized_metadata(metadata: dict[str, str], report: dict, rank: int | None, energy: float | None) -> dict[str, str]:
    meta = dict(metadata)
    alphas = set()
    meta["ss_network_dim"] = str(rank) if rank is not None else "Dynamic"  # nominal, as kohya's network_dim
    try:
        old_dim = float(metadata.get("ss_network_dim", "0"))
        old_alpha = float(metadata.get("ss_network_alpha", "0"))
        if rank is not None and old_dim:
            alphas.add(old_alpha * rank / old_dim)
    except ValueError:
        pass
    meta["ss_network_alpha"] = str(alphas.pop()) if len(alphas) == 1 and rank is not None else "Dynamic"
    try:
        args = json.loads(meta.get("ss_network_args", "") or "{}")
        if isinstance(args, dict) and "conv_dim" in args and rank is not None:
            old = float(args["conv_dim"])
            args["conv_dim"] = min(int(old), rank)
            if "conv_alpha" in args:
                args["conv_alpha"] = float(args["conv_alpha"]) * args["conv_dim"] / old
            meta["ss_network_args"] = json.dumps(args)
    except (ValueError, TypeError):
        pass
    how = f"rank {rank}" if rank is not None else f"{energy:.0%} energy per module"
    comment = meta.get("ss_training_comment", "")
    meta["ss_training_comment"] = (comment + "; " if comment else "") + f"resized by lora-daemon to {how}"
    return meta


def resize_lora(path: Path, *, rank: int | None = None, energy: float | None = None, out_dir: Path | None = None,
                name: str | None = None, progress: Progress = no_progress) -> ResizeResult:
    """Write a lower-rank copy of the LoRA at `path`; the original is never touched."""
    lora = read_lora(path)
    tensors, report, kept = resize_tensors(lora, rank=rank, energy=energy, progress=progress)
    suffix = f"rank{rank}" if rank is not None else f"energy{round(energy * 100)}"
    folder, stem = output_place(lora.path, out_dir, name, f"{Path(path).stem}-{suffix}")
    written = publish_lora(folder, stem, tensors, resized_metadata(lora.metadata, report, rank, energy))
    return ResizeResult(written, report, kept)
