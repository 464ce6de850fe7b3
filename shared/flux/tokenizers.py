"""The two Flux tokenizers, offline: CLIP-L built from open_clip's BPE (as for SD) and T5 found where
users already have it.

No installed package ships T5's SentencePiece vocabulary, but every Flux user's host does: ComfyUI
ships `comfy/text_encoders/t5_tokenizer/`, Forge ships the FLUX.1 repositories' `tokenizer_2/` under
`backend/huggingface/black-forest-labs/`, a diffusers folder has `tokenizer_2/`, and a hub download
leaves one in the Hugging Face cache. `find_t5_tokenizer` looks in those places, starting from the
model files and walking up to the host's root.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from shared.errors import ModelError

T5_MAX_LENGTH = {"dev": 512, "schnell": 256}  # what kohya and diffusers' FluxPipeline use per variant
# Where a tokenizer folder sits relative to a host's (or repository's) root
HOST_T5_FOLDERS = (
    "comfy/text_encoders/t5_tokenizer",  # ComfyUI
    "backend/huggingface/black-forest-labs/FLUX.1-dev/tokenizer_2",  # Forge
    "backend/huggingface/black-forest-labs/FLUX.1-schnell/tokenizer_2",
    "tokenizer_2",  # a diffusers FLUX.1 folder
    "t5_tokenizer",
)
HUB_REPOS = ("models--black-forest-labs--FLUX.1-dev", "models--black-forest-labs--FLUX.1-schnell",
             "models--google--t5-v1_1-xxl")
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
UP_LEVELS = 5  # models/diffusion_models/<subfolder>/file.safetensors is 3-4 levels below the host root


def clip_tokenizer():
    from shared.images.clip_tokenizer import clip_tokenizer as build

    return build()


def is_tokenizer_folder(folder: Path) -> bool:
    return folder.is_dir() and any((folder / name).is_file() for name in TOKENIZER_FILES)


def _hub_candidates() -> list[Path]:
    roots = [os.environ.get("HF_HUB_CACHE"), os.environ.get("HF_HOME") and str(Path(os.environ["HF_HOME"]) / "hub"),
             str(Path.home() / ".cache" / "huggingface" / "hub")]
    out = []
    for root in filter(None, roots):
        for repo in HUB_REPOS:
            for snapshot in sorted((Path(root) / repo / "snapshots").glob("*")):
                out += [snapshot / "tokenizer_2", snapshot]
    return out


def t5_candidates(near: Iterable[Path]) -> list[Path]:
    """Folders that may hold the T5 tokenizer, nearest first."""
    out: list[Path] = []
    for start in near:
        start = Path(start).resolve()
        folder = start if start.is_dir() else start.parent
        for level in [folder, *list(folder.parents)[:UP_LEVELS]]:
            out += [level / rel for rel in HOST_T5_FOLDERS]
    return out + _hub_candidates()


def find_t5_tokenizer(near: Iterable[Path], explicit: Path | None = None) -> Path:
    """The T5 tokenizer folder: `explicit` (the `t5_tokenizer` key) or the first found near the
    model files; one clear error naming where to put it otherwise."""
    if explicit is not None:
        if not is_tokenizer_folder(Path(explicit)):
            raise ModelError(f"t5_tokenizer: {explicit} is not a tokenizer folder (no tokenizer.json or spiece.model)")
        return Path(explicit)
    for candidate in t5_candidates(near):
        if is_tokenizer_folder(candidate):
            return candidate
    raise ModelError(
        "T5 tokenizer not found: set t5_tokenizer to a folder with tokenizer.json (ComfyUI ships one in "
        "comfy/text_encoders/t5_tokenizer, Forge in backend/huggingface/black-forest-labs/FLUX.1-dev/tokenizer_2, "
        "a diffusers FLUX.1 folder in tokenizer_2)"
    )


def load_t5_tokenizer(folder: Path, max_length: int = 512):
    from transformers import T5TokenizerFast

    try:
        tokenizer = T5TokenizerFast.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelError(f"{folder}: cannot load the T5 tokenizer ({str(exc).splitlines()[0][:200]})") from None
    tokenizer.model_max_length = max_length
    return tokenizer
