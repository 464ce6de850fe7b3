"""How images become training samples (SD, Flux): resolution, buckets, augmentation and caches."""

from pathlib import Path

from .setting import IMAGES, SD_ONLY, Form, Rule, Setting

SECTION = "Images"
SETTINGS = (
    Setting("resolution", int, 512, "Training resolution in pixels (images are resized and cropped to it). The "
            "model adds its own multiple, read from its file: 64 for SD1.x/SD2.x and 32 for SDXL (VAE and UNet), "
            "16 for Flux (VAE and its 2x2 packing).",
            tasks=IMAGES, minimum=64, maximum=8192, multiple_of=8, form=Form("basic", "Resolution")),
    Setting("enable_bucket", bool, True, "Aspect-ratio bucketing: train each image near its own shape.",
            tasks=IMAGES),
    Setting("bucket_reso_steps", int, 64, "Bucket sizes are multiples of this (raised to what the UNet needs).",
            tasks=IMAGES, minimum=1, maximum=8192),
    Setting("min_bucket_reso", int, 256, "Smallest bucket side in pixels (lowered to resolution/2 for small "
            "resolutions).", tasks=IMAGES, minimum=1, maximum=16384),
    Setting("max_bucket_reso", int, 2048, "Largest bucket side in pixels.", tasks=IMAGES, minimum=1,
            maximum=16384),
    Setting("bucket_upscale", bool, False, "Enlarge images smaller than the resolution to fill a bucket.",
            tasks=IMAGES),
    Setting("random_flip", bool, False, "Mirror images left-right at random.", tasks=IMAGES),
    Setting("random_crop", bool, False, "Crop at a random place instead of the centre.", tasks=IMAGES),
    Setting("cache_latents", str, "no", "Encode each image with the VAE once: keep the latents in memory or on disk "
            "(reused across runs).", tasks=IMAGES, choices=("no", "memory", "disk")),
    Setting("cache_dir", Path, None, "Disk cache folder (latents; Flux: also the T5/CLIP-L outputs). Default: "
            "~/.cache/lora-daemon/latents (Flux text: ~/.cache/lora-daemon/flux-text).",
            tasks=IMAGES, optional=True, path="write"),
    Setting("cache_text_encoder_outputs", bool, False, "Encode each caption once (needs a frozen text encoder and "
            "fixed captions). Flux: see flux_text_cache.", tasks=SD_ONLY),
)


def _text_cache_needs_fixed_captions(v) -> str | None:
    if not v["cache_text_encoder_outputs"]:
        return None
    varying = [k for k in ("train_text_encoder", "shuffle_caption") if v[k]]
    if v["caption_dropout_rate"] > 0:
        varying.append("caption_dropout_rate")
    if varying:
        return ("cache_text_encoder_outputs needs a frozen text encoder and fixed captions; "
                f"turn off {', '.join(varying)} or the cache")
    return None


def _latent_cache_keeps_one_crop(v) -> str | None:
    if v["cache_latents"] != "no" and v["random_crop"]:
        return "cache_latents keeps one crop per image; turn off random_crop or the cache"
    return None


def _fits_the_models_downsampling(v, family) -> str | None:
    """The image must survive the model's own VAE and UNet downsampling, read from the checkpoint."""
    multiple, resolution = family.resolution_multiple, v["resolution"]
    if not multiple or resolution % multiple == 0:
        return None
    lower = resolution // multiple * multiple
    options = " or ".join(str(n) for n in (lower, lower + multiple) if n >= 64)
    return (f"resolution {resolution} is not a multiple of {multiple}, which this {family.name} model needs (its "
            f"VAE and UNet halve the image {multiple.bit_length() - 1} times; {family.how}); use {options}")


RULES = (
    Rule(("resolution",), _fits_the_models_downsampling, tasks=SD_ONLY, family=True),
    Rule(("cache_text_encoder_outputs", "train_text_encoder", "shuffle_caption", "caption_dropout_rate"),
         _text_cache_needs_fixed_captions, tasks=SD_ONLY),
    Rule(("cache_latents", "random_crop"), _latent_cache_keeps_one_crop, tasks=IMAGES),
)
