"""The latent cache of an image job (SD, Flux): the VAE's latent distribution (mean and log-variance)
of one image at one bucket size, crop and flip.

A step samples from it with the run's generator, so a cached step computes exactly what an uncached
one does. On disk an entry is keyed by the image file's hash, the VAE weights' hash and the
size/crop/flip, so it is reused across runs while image and VAE stay the same and is never served for
a changed image.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from shared.files import atomic_write
from shared.images.dataset import load_pixels, plan_crop


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lora-daemon" / "latents"


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def module_hash(module) -> str:
    """A hash of a module's weights (names, shapes, values)."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


class LatentCache:
    """`get(key)` / `put(key, tensor)`; `mode` is memory or disk (disk also keeps a memory copy)."""

    def __init__(self, mode: str, folder: Path | None, vae_hash: str):
        self.mode = mode
        self.folder = Path(folder or default_cache_dir()) / vae_hash[:16] if mode == "disk" else None
        self.memory: dict[str, object] = {}
        self.hits = 0
        self.new = 0
        self._hashes: dict[Path, str] = {}

    def key(self, path: Path, bucket, crop, flip: bool) -> str:
        path = Path(path)
        if path not in self._hashes:
            self._hashes[path] = file_hash(path)
        return f"{self._hashes[path][:32]}-{bucket[0]}x{bucket[1]}-{crop[0]}_{crop[1]}-{'f' if flip else 'n'}"

    def get(self, key: str):
        if key in self.memory:
            return self.memory[key]
        if self.folder is not None:
            path = self.folder / f"{key}.safetensors"
            if path.is_file():
                from safetensors import SafetensorError
                from safetensors.torch import load_file

                try:
                    value = load_file(str(path))["latent_dist"]
                except (SafetensorError, OSError, KeyError):
                    return None  # a damaged entry is recomputed and rewritten
                self.memory[key] = value
                self.hits += 1
                return value
        return None

    def put(self, key: str, value) -> None:
        value = value.detach().to("cpu").contiguous()
        self.memory[key] = value
        self.new += 1
        if self.folder is not None:
            from safetensors.torch import save_file

            atomic_write(self.folder / f"{key}.safetensors", lambda p: save_file({"latent_dist": value}, str(p)))


def free_vae_encoder(vae) -> bool:
    """Drop the VAE's encoder half once every latent is cached: a step reads the cache and a render
    only decodes. False when it was already gone."""
    if vae.encoder is None:
        return False
    vae.encoder = vae.quant_conv = None
    return True


def build_latent_cache(cfg, vae, data, device, reporter, held_out=None) -> LatentCache:
    """Encode every image once with `vae` (an AutoencoderKL: SD's or Flux's), both ways when flips
    are on, at its bucket size and centre crop; the `held_out` validation images (another TrainData)
    unflipped only, as validation sees them."""
    import torch

    cache = LatentCache(cfg.cache_latents, cfg.cache_dir, module_hash(vae))
    flips = (False, True) if cfg.random_flip else (False,)
    for part, part_flips in ((data, flips), (held_out, (False,))):
        for index, item in enumerate(part.items if part is not None else []):
            bucket = part.plan.buckets[index]
            resized, crop = plan_crop(part.sizes[index], bucket, random_crop=False, rng=None)
            for flip in part_flips:
                key = cache.key(item.path, bucket, crop, flip)
                if cache.get(key) is None:
                    pixels = load_pixels(item.path, bucket, resized, crop, flip)[None]
                    with torch.no_grad():
                        dist = vae.encode(pixels.to(device, vae.dtype)).latent_dist
                    cache.put(key, dist.parameters[0].float())
    reporter.log(f"Latent cache ({cfg.cache_latents}): {cache.hits} reused, {cache.new} encoded")
    return cache
