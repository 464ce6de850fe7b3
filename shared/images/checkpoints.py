"""Reading a single-file checkpoint and loading it into a model built on the meta device, for every
image family: a `.ckpt` is a pickle and is only ever read with `weights_only=True`, and a component
loads only when its weight names and shapes match exactly (one error naming the file otherwise; never
a silent partial load)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.errors import ModelError


def read_checkpoint(path: Path, cast: Callable[[str, Any], Any] | None = None) -> dict:
    """The tensors of a single-file checkpoint. `.ckpt` files are pickles: never unpickle code.

    `cast(key, tensor)` is applied as each tensor is read, so a model loads straight into its storage
    type: an fp32 file read for bf16 storage never sits in memory in fp32 as a whole (safetensors files
    are read one tensor at a time; a `.ckpt` is read whole first)."""

    if cast is not None and Path(path).suffix.lower() == ".safetensors":
        return _read_safetensors_cast(Path(path), cast)
    state = _read_whole(path)
    return {k: cast(k, v) for k, v in state.items()} if cast else state


def into(dtype, keep: tuple[str, ...] = ()) -> Callable[[str, Any], Any]:
    """A `read_checkpoint` cast: floating tensors to `dtype`, except those whose name starts with one
    of `keep` (left in the file's type, for a component stored in another one)."""

    def cast(key: str, tensor):
        return tensor.to(dtype) if tensor.is_floating_point() and not key.startswith(keep) else tensor

    return cast


def _read_safetensors_cast(path: Path, cast) -> dict:
    from shared.weight_files import stream_safetensors

    try:
        return stream_safetensors(path, cast)
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ModelError(f"{path}: not a readable checkpoint ({reason})") from None


def _read_whole(path: Path) -> dict:
    import torch

    path = Path(path)
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every reader error means "not a usable checkpoint"
        if "Weights only load failed" in str(exc):  # torch's own text suggests weights_only=False: never
            raise ModelError(
                f"{path}: not a readable checkpoint (it holds Python objects besides tensors, which could run "
                "code when loaded; it was not loaded). Use a .safetensors copy of the model"
            ) from None
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ModelError(f"{path}: not a readable checkpoint ({reason})") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ModelError(f"{path}: not a checkpoint (no mapping of weight names to tensors inside)")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


def load_strict(module, state_dict: dict, path: Path, component: str, dtype: Any = "float32") -> None:
    """Load `state_dict` into `module` (built on the meta device) only if names and shapes match
    exactly: one clear error naming the file otherwise. Floating tensors become `dtype` (None: keep
    each tensor's own dtype, e.g. a float8 file's weights)."""
    import torch

    expected = module.state_dict()
    # Buffers some files carry and some models do not (CLIP position_ids)
    state_dict = {k: v for k, v in state_dict.items() if k in expected or not k.endswith("position_ids")}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state_dict) if tuple(expected[k].shape) != tuple(state_dict[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} weights missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} of another shape (e.g. {k}: {tuple(state_dict[k].shape)} "
                f"vs {tuple(expected[k].shape)})"
            )
        raise ModelError(
            f"{path}: the {component} does not match its config: {'; '.join(parts)}. "
            "For a model of non-standard size set model_config to its diffusers config folder."
        )
    if dtype is not None:
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    module.load_state_dict(state_dict, strict=True, assign=True)
