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
    Setting("cache_latents", str, "auto", "Encode each image with the VAE once, both ways when random_flip is on, "
            "and keep the latents in memory or on disk (reused across runs); no step then runs the VAE encoder, "
            "which is then freed. auto: memory whenever the cache trains the same numbers (not with random_crop).",
            tasks=IMAGES, choices=("auto", "no", "memory", "disk")),
    Setting("cache_dir", Path, None, "Disk cache folder (latents; Flux: also the T5/CLIP-L outputs). Default: "
            "~/.cache/lora-daemon/latents (Flux text: ~/.cache/lora-daemon/flux-text).",
            tasks=IMAGES, optional=True, path="write"),
    Setting("cache_text_encoder_outputs", str, "auto", "Encode each caption (and every prompt a sample, preview "
            "or evaluation renders) once; the text encoders are then freed. Needs a frozen text encoder and fixed "
            "captions. auto: yes whenever that holds. Flux: see flux_text_cache.", tasks=SD_ONLY,
            choices=("auto", "yes", "no")),
)


def _caption_varies(v) -> list[str]:
    """The settings that make a caption's encoding differ from step to step."""
    varying = [k for k in ("train_text_encoder", "shuffle_caption") if v[k]]
    return varying + (["caption_dropout_rate"] if v["caption_dropout_rate"] > 0 else [])


def _text_cache_needs_fixed_captions(v) -> str | None:
    varying = _caption_varies(v)
    if v["cache_text_encoder_outputs"] != "yes" or not varying:
        return None
    return ("cache_text_encoder_outputs needs a frozen text encoder and fixed captions; "
            f"turn off {', '.join(varying)}, or set the cache to auto")


def _latent_cache_keeps_one_crop(v) -> str | None:
    if v["cache_latents"] in ("memory", "disk") and v["random_crop"]:
        return "cache_latents keeps one crop per image; turn off random_crop, or set cache_latents: auto"
    return None


def cache_plan(v) -> dict[str, tuple[str, str]]:
    """What each cache set to `auto` becomes for the settings `v`, and why: {key: (value, reason)}.

    A cache is on whenever a cached step trains exactly the numbers an uncached one would (flips are
    cached both ways; the latent distribution, not a sample of it, is stored), off where the step's
    input changes per step."""
    plan = {}
    if v["cache_latents"] == "auto":
        plan["cache_latents"] = (("no", "random_crop changes the pixels every step") if v["random_crop"] else
                                 ("memory", "no setting changes an image's pixels between steps"))
    if v["cache_text_encoder_outputs"] == "auto":
        varying = _caption_varies(v)
        plan["cache_text_encoder_outputs"] = (("no", f"{', '.join(varying)} changes the text encoding every step")
                                              if varying else ("yes", "the captions and the text encoders are fixed"))
    return plan


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
