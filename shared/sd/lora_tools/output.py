"""Writing a tool's output: a LoRA or a checkpoint under a new name, metadata that names it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from shared.errors import ConfigError
from shared.files import publish_new
from shared.schema.output import NAME_HELP, name_fits

Progress = Callable[[int, int, str], None]


def no_progress(done: int, total: int, what: str) -> None:
    """The default `progress` callback: report nothing."""


def output_place(source: Path, out_dir: Path | None, name: str | None, default_stem: str) -> tuple[Path, str]:
    """The folder (default: beside the source) and stem of an output; the stem is checked like
    output_name, as it becomes the `<lora:NAME:w>` alias."""
    stem = name or default_stem
    if not name_fits(stem):
        raise ConfigError(f"--name: output_name {stem!r} must be {NAME_HELP}")
    return Path(out_dir) if out_dir else Path(source).parent, stem


def publish_lora(folder: Path, stem: str, tensors: dict, metadata: dict[str, str]) -> Path:
    """`stem.safetensors` (or stem_2, ...) with the header naming the file it ends up as and kohya's
    hash of its tensors (both are what A1111 shows and matches on)."""
    from safetensors.torch import save_file

    from shared.images.training_metadata import addnet_hash

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    digest = addnet_hash(tensors)

    def write(tmp: Path, final_stem: str) -> None:
        meta = {k: str(v) for k, v in metadata.items()}
        meta.pop("sshs_legacy_hash", None)  # of the old tensors
        meta["sshs_model_hash"] = digest
        meta["ss_output_name"] = final_stem
        if "modelspec.title" in meta:
            meta["modelspec.title"] = final_stem
        save_file(tensors, str(tmp), metadata=meta)

    return publish_new(folder, stem, ".safetensors", write)


def publish_checkpoint(folder: Path, stem: str, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    return publish_new(folder, stem, ".safetensors", lambda tmp, _: save_file(tensors, str(tmp), metadata=metadata))
