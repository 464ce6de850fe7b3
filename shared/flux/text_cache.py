"""T5 + CLIP-L outputs cached per caption, in memory or on disk, so the 9.5 GB T5-XXL runs once per
caption and then leaves the device (kohya's --cache_text_encoder_outputs[_to_disk]).

An entry is keyed by the caption, the T5 token length and a fingerprint of the encoders (by default
a hash of their weights), so it is reused across runs while encoders and captions stay the same and
never served for changed ones. Files are written whole or not at all (atomic_write).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from shared.files import atomic_write
from shared.flux.conditioning import FluxText, encode_text


def default_cache_dir() -> Path:
    from shared.images.latent_cache import default_cache_dir as latents_dir

    return latents_dir().parent / "flux-text"


def encoders_fingerprint(model) -> str:
    from shared.images.latent_cache import module_hash

    return hashlib.sha256((module_hash(model.text_encoder) + module_hash(model.text_encoder_2)).encode()).hexdigest()


class TextCache:
    """`get(caption)` / `put(caption, text)`; `folder` None keeps entries in memory only."""

    def __init__(self, fingerprint: str, max_length: int, folder: Path | None = None):
        self.fingerprint, self.max_length = fingerprint, max_length
        self.folder = Path(folder) / fingerprint[:16] if folder is not None else None
        self.memory: dict[str, FluxText] = {}
        self.hits = self.new = 0

    def key(self, caption: str) -> str:
        return hashlib.sha256(f"{self.max_length}\0{caption}".encode()).hexdigest()[:40]

    def get(self, caption: str) -> FluxText | None:
        if caption in self.memory:
            return self.memory[caption]
        if self.folder is None:
            return None
        path = self.folder / f"{self.key(caption)}.safetensors"
        if not path.is_file():
            return None
        import torch
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            data = load_file(str(path))
            text = FluxText(data["prompt_embeds"], data["pooled"], torch.zeros(data["prompt_embeds"].shape[1], 3))
        except (SafetensorError, OSError, KeyError):
            return None  # a damaged entry is encoded again and rewritten
        self.memory[caption] = text
        self.hits += 1
        return text

    def put(self, caption: str, text: FluxText) -> None:
        text = FluxText(text.prompt_embeds.detach().cpu().contiguous(), text.pooled.detach().cpu().contiguous(),
                        text.text_ids.detach().cpu())
        self.memory[caption] = text
        self.new += 1
        if self.folder is not None:
            from safetensors.torch import save_file

            tensors = {"prompt_embeds": text.prompt_embeds, "pooled": text.pooled}
            atomic_write(self.folder / f"{self.key(caption)}.safetensors", lambda p: save_file(tensors, str(p)))

    def fill(self, model, captions: list[str]) -> None:
        """Encode every caption not cached yet (one at a time: T5-XXL activations are large)."""
        import torch

        for caption in dict.fromkeys(captions):
            if self.get(caption) is None:
                with torch.no_grad():
                    self.put(caption, encode_text(model, [caption], max_sequence_length=self.max_length))

    def batch(self, captions: list[str], device=None, dtype=None) -> FluxText:
        texts = [self.memory[c] if c in self.memory else self.get(c) for c in captions]
        missing = [c for c, t in zip(captions, texts) if t is None]
        if missing:  # a caller's bug (the task caches every caption and prompt it will need), never user input
            raise KeyError(f"text cache: {missing[0]!r} was not cached")
        return FluxText.stack(texts).to(device, dtype)


def free_text_encoders(model, names: tuple[str, ...] = ("text_encoder", "text_encoder_2")) -> None:
    """Drop the encoders' weights once every caption is cached (they are not needed again unless the
    captions change); sampling previews then need the cache to hold the sample prompts too. `names`:
    which (a task that trains CLIP-L frees T5 alone)."""
    for name in names:
        encoder = getattr(model, name)
        if encoder is not None:
            encoder.to("meta")
