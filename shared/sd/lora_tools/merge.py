"""`lora merge`: LoRAs into a base checkpoint, or several LoRAs into one.

Into a checkpoint: each module's weight change (LoRA, LoCon, LoHa, LoKr, DoRA; the hosts' arithmetic,
shared.sd.lora_file) is added at its weight to the LDM weight it names, in fp32, and stored back in
that weight's own dtype; every other tensor of the base file is kept as it was. The result is a
single-file checkpoint in the layout A1111, Forge and ComfyUI load (and our trainer loads).

Several LoRAs into one:
- `concat` (exact, LoRA/LoCon inputs only): each input's up weights are multiplied by its weight and
  its own alpha/rank and the ranks are stacked, so up @ down of the result is exactly the weighted sum;
  alpha = the new rank (scale 1). The rank of a module is the sum of the inputs' ranks.
- `svd` (any type, to `rank`): the weighted sum of the weight changes, factorised by SVD to the rank
  (scale 1); the kept energy is reported as by resize.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared.sd.lora_file import LoraFile, LoraFileError, apply_module, module_delta, own_shape, read_lora
from shared.sd.lora_tools.output import Progress, no_progress, output_place, publish_checkpoint, publish_lora


@dataclass
class MergeResult:
    path: Path
    modules: int
    kept_energy: float | None = None

    def summary(self) -> str:
        energy = f", kept {self.kept_energy:.2%} of the energy" if self.kept_energy is not None else ""
        return f"merged {self.modules} modules{energy}; wrote {self.path}"


def parse_weighted(items: list[str]) -> list[tuple[Path, float]]:
    """`file.safetensors` or `file.safetensors:0.7` (a weight after the last colon)."""
    out = []
    for item in items:
        path, weight = item, 1.0
        head, sep, tail = item.rpartition(":")
        if sep and head and not Path(item).exists():
            try:
                weight = float(tail)
                path = head
            except ValueError:
                pass
        out.append((Path(path), weight))
    return out


def _table_for(arch: str, model_config: Path | None):
    from shared.sd.lora_names import configs_for, module_table

    return module_table(arch, configs_for(arch, model_config))


def merge_into_checkpoint(base: Path, loras: list[tuple[Path, float]], *, out_dir: Path | None = None,
                          name: str | None = None, model_config: Path | None = None,
                          progress: Progress = no_progress) -> MergeResult:
    """Write `base` with the LoRAs applied (each at its weight) as a new single-file checkpoint."""
    from shared.sd.base_model import detect_architecture, read_checkpoint

    if not loras:
        raise LoraFileError("merge: name at least one LoRA file")
    state = read_checkpoint(Path(base))
    arch = detect_architecture(state, Path(base))
    table = _table_for(arch, model_config)
    files = [(read_lora(path), weight) for path, weight in loras]
    total = sum(len(f.modules) for f, _ in files)
    done = merged = 0
    for lora, weight in files:
        _check_kohya(lora)
        if lora.arch() != arch and not (arch == "sd2" and lora.arch() == "sd1"):
            raise LoraFileError(f"{lora.path}: a LoRA for {lora.arch()}, but {base} is an {arch} checkpoint")
        for key, module in lora.modules.items():
            target = table.get(key)
            if target is None:
                raise LoraFileError(f"{lora.path}: module {key} names no weight of an {arch} model")
            if target.ldm_key not in state:
                raise LoraFileError(f"{base}: has no {target.ldm_key} for {lora.path.name}'s module {key}")
            full = state[target.ldm_key]
            if target.rows is None:
                state[target.ldm_key] = apply_module(full, module, weight).to(full.dtype)
            else:  # one third of a fused q/k/v weight
                n = full.shape[0] // 3
                part = full[target.rows * n : (target.rows + 1) * n]
                new = full.clone()
                new[target.rows * n : (target.rows + 1) * n] = apply_module(part, module, weight).to(full.dtype)
                state[target.ldm_key] = new
            merged += 1
            done += 1
            progress(done, total, key)
    folder, stem = output_place(Path(base), out_dir, name, f"{Path(base).stem}-merged")
    return MergeResult(publish_checkpoint(folder, stem, state), merged)


def _check_kohya(lora: LoraFile) -> None:
    if lora.layout != "kohya":
        raise LoraFileError(f"{lora.path}: a diffusers-layout file; convert it to kohya first (lora convert --to kohya)")


def merge_loras(loras: list[tuple[Path, float]], *, mode: str = "concat", rank: int | None = None,
                out_dir: Path | None = None, name: str | None = None, model_config: Path | None = None,
                progress: Progress = no_progress) -> MergeResult:
    """Several LoRAs (each at its weight) as one LoRA file."""
    import torch

    from shared.sd.lora_tools.resize import svd_factors

    if len(loras) < 2:
        raise LoraFileError("merge: name at least two LoRA files to merge into one (or --base to merge into a checkpoint)")
    if mode not in ("concat", "svd"):
        raise LoraFileError(f"merge: --mode must be concat or svd, got {mode!r}")
    if mode == "svd" and (rank is None or rank < 1):
        raise LoraFileError("merge: --mode svd needs --rank (at least 1)")
    files = [(read_lora(path), weight) for path, weight in loras]
    for lora, _ in files:
        _check_kohya(lora)
        if lora.is_dora:
            raise LoraFileError(f"{lora.path}: a DoRA file; its magnitudes do not add up with other LoRAs (merge it "
                                "into a checkpoint instead)")
    arches = {lora.arch() for lora, _ in files}
    if len(arches) > 1:
        raise LoraFileError(f"merge: the LoRAs are for different models ({', '.join(sorted(arches))})")
    keys = list(dict.fromkeys(k for lora, _ in files for k in lora.modules))
    out, kept, total_energy = {}, 0.0, 0.0
    table = None
    if mode == "concat":
        bad = [(lora.path, m.kind) for lora, _ in files for m in lora.modules.values() if m.kind not in ("lora", "locon")]
        if bad:
            raise LoraFileError(f"{bad[0][0]}: has {bad[0][1]} modules; --mode concat stacks LoRA/LoCon only "
                                "(use --mode svd --rank N)")
    arch = arches.pop()
    for i, key in enumerate(keys):
        present = [(lora.modules[key], w) for lora, w in files if key in lora.modules]
        if mode == "concat":
            ups = [m.parts["lora_up.weight"].float() * (w * m.scale) for m, w in present]
            downs = [m.parts["lora_down.weight"].float() for m, _ in present]
            up, down = torch.cat(ups, dim=1), torch.cat(downs, dim=0)
            out[f"{key}.lora_up.weight"] = up.to(torch.float16)
            out[f"{key}.lora_down.weight"] = down.to(torch.float16)
            out[f"{key}.alpha"] = torch.tensor(float(down.shape[0]), dtype=torch.float16)
        else:
            shape = own_shape(present[0][0])
            if shape is None:  # a LoHa/LoKr conv: the model's layout knows the kernel
                table = table or _table_for(arch, model_config)
                target = table.get(key)
                if target is None:
                    raise LoraFileError(f"merge: module {key} names no weight of an {arch} model")
                shape = target.shape
            delta = sum(module_delta(m, shape) * w for m, w in present)
            flat = delta.flatten(1)
            k = min(rank, *flat.shape)
            up, down, s = svd_factors(flat, k)
            kept += (s[:k] ** 2).sum().item()
            total_energy += (s**2).sum().item()
            conv = len(shape) == 4
            out[f"{key}.lora_up.weight"] = (up[:, :, None, None] if conv else up).to(torch.float16)
            out[f"{key}.lora_down.weight"] = (down.reshape(k, *shape[1:]) if conv else down).to(torch.float16)
            out[f"{key}.alpha"] = torch.tensor(float(k), dtype=torch.float16)
        progress(i + 1, len(keys), key)
    first = files[0][0]
    meta = dict(first.metadata)
    meta["ss_network_module"] = "networks.lora"
    meta["ss_network_dim"] = str(rank) if mode == "svd" else "Dynamic"
    meta["ss_network_alpha"] = str(float(rank)) if mode == "svd" else "Dynamic"
    meta.pop("ss_network_args", None)
    parts = ", ".join(f"{lora.path.name}:{w:g}" for lora, w in files)
    meta["ss_training_comment"] = f"merged by lora-daemon ({mode}) from {parts}"
    folder, stem = output_place(first.path, out_dir, name, f"{first.path.stem}-merged")
    written = publish_lora(folder, stem, out, meta)
    return MergeResult(written, len(keys), kept / total_energy if mode == "svd" and total_energy else None)
