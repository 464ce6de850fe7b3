"""Flux.1 jobs: the separate model files, which blocks get LoRA, the flow-matching objective and the
memory levers of a consumer card.

The family rules read what the pre-flight found in the base model's header (shared/model_family.py):
`arch` (flux1-dev or flux1-schnell), `layout` (bfl: the Black Forest Labs transformer file alone;
comfy: ComfyUI's all-in-one checkpoint; diffusers: a FluxPipeline folder) and `blocks` (double,
single).
"""

import re
from pathlib import Path

from .setting import FLUX_ONLY, Form, Rule, Setting

SECTION = "Flux"
# kohya's Flux LoRA layer groups (shared/flux/lora.py maps each to its BFL modules)
LORA_PARTS = ("img_attn", "img_mlp", "img_mod", "txt_attn", "txt_mlp", "txt_mod", "single", "single_mod")
# attention and MLP of both block kinds; the modulation Linears (the largest) only on request
DEFAULT_PARTS = ("img_attn", "img_mlp", "txt_attn", "txt_mlp", "single")
TIMESTEP_SAMPLING = ("uniform", "sigmoid", "logit_normal", "shift", "flux_shift")
BLOCKS_PATTERN = r"all|none|\s*[0-9]{1,3}(-[0-9]{1,3})?(\s*,\s*[0-9]{1,3}(-[0-9]{1,3})?)*\s*"
BLOCKS_HELP = "all, none, or block numbers and ranges such as 0,1,4-6"
# The separate files a Black Forest Labs transformer file needs, and where people usually have them
FILES = {
    "flux_ae": ("the autoencoder", "ae.safetensors", "ComfyUI: models/vae; Forge: models/VAE"),
    "flux_clip_l": ("CLIP-L", "clip_l.safetensors",
                    "ComfyUI: models/text_encoders (older: models/clip); Forge: models/text_encoder"),
    "flux_t5xxl": ("T5-XXL", "t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors",
                   "ComfyUI: models/text_encoders (older: models/clip); Forge: models/text_encoder"),
}
RESOLUTION_MULTIPLE = 16  # the autoencoder's x8 times the transformer's 2x2 patches

SETTINGS = (
    Setting("flux_ae", Path, None, "The Flux autoencoder, ae.safetensors: needed with "
            "a Black Forest Labs transformer file (ComfyUI keeps it in models/vae, Forge in models/VAE).",
            tasks=FLUX_ONLY, optional=True, path="read", exists="file", form=Form("host", "Autoencoder (ae)",
                                                                                   widget="vae")),
    Setting("flux_clip_l", Path, None, "The CLIP-L text encoder, clip_l.safetensors: needed with a Black Forest Labs "
            "transformer file (ComfyUI: models/text_encoders or models/clip; Forge: models/text_encoder).",
            tasks=FLUX_ONLY, optional=True, path="read", exists="file",
            form=Form("host", "CLIP-L", widget="text_encoder")),
    Setting("flux_t5xxl", Path, None, "The T5-XXL text encoder, t5xxl_fp16 or t5xxl_fp8_e4m3fn.safetensors: needed "
            "with a Black Forest Labs transformer file (the same folders as CLIP-L).",
            tasks=FLUX_ONLY, optional=True, path="read", exists="file",
            form=Form("host", "T5-XXL", widget="text_encoder")),
    Setting("t5_tokenizer", Path, None, "Folder with the T5 tokenizer (tokenizer.json or spiece.model). Default: found "
            "beside the model files, where ComfyUI (comfy/text_encoders/t5_tokenizer), Forge "
            "(backend/huggingface/black-forest-labs/FLUX.1-dev/tokenizer_2) or a diffusers folder (tokenizer_2) "
            "keep it, or in the Hugging Face cache.", tasks=FLUX_ONLY, optional=True, path="read", exists="dir"),
    Setting("fp8_base", str, "auto", "Store the transformer blocks' weights in float8_e4m3fn (half of bf16), computed "
            "in bf16. auto: for an fp8 file (kept bit for bit), or when the bf16 model would not fit the card.",
            tasks=FLUX_ONLY,
            choices=("auto", "true", "false"), form=Form("basic", "fp8 base")),
    Setting("blocks_to_swap", str, "auto", "Keep this many transformer blocks (the last ones: single blocks first) in "
            "CPU RAM and bring each in for its forward and backward. auto: as many as it takes to fit the card "
            "(none on the CPU or when the model fits).", tasks=FLUX_ONLY, pattern=r"auto|[0-9]{1,3}",
            pattern_help="auto or a number of blocks (FLUX.1 has 19 double + 38 single)",
            form=Form("basic", "Blocks to swap", id="swap")),
    Setting("flux_text_cache", str, "auto", "Encode each caption once with T5-XXL and CLIP-L, then free them (T5-XXL "
            "alone is 9.5 GB): disk (reused across runs, under cache_dir), memory, or no. auto: disk when the "
            "captions are fixed (no shuffle_caption, no caption_dropout_rate), else no. With train_text_encoder "
            "only T5 is cached and freed.", tasks=FLUX_ONLY, choices=("auto", "disk", "memory", "no")),
    Setting("flux_lora_parts", list, DEFAULT_PARTS, "Which layers of the blocks get LoRA (kohya's groups): "
            "img_attn, img_mlp, img_mod, txt_attn, txt_mlp, txt_mod (double blocks), single, single_mod (single "
            "blocks).", tasks=FLUX_ONLY, min_items=1),
    Setting("flux_double_blocks", str, "all", "Double blocks that get LoRA (0-18 in FLUX.1).", tasks=FLUX_ONLY,
            pattern=BLOCKS_PATTERN, pattern_help=BLOCKS_HELP),
    Setting("flux_single_blocks", str, "all", "Single blocks that get LoRA (0-37 in FLUX.1).", tasks=FLUX_ONLY,
            pattern=BLOCKS_PATTERN, pattern_help=BLOCKS_HELP),
    Setting("timestep_sampling", str, "shift", "How each step's noise level is drawn: shift (a sigmoid draw moved "
            "towards noise by discrete_flow_shift, kohya's recommendation), flux_shift (shifted by resolution, as "
            "FLUX.1-dev samples), sigmoid, logit_normal (SD3's), uniform.", tasks=FLUX_ONLY,
            choices=TIMESTEP_SAMPLING),
    Setting("sigmoid_scale", float, 1.0, "Spread of the sigmoid, shift and flux_shift draws.", tasks=FLUX_ONLY,
            minimum=0, exclusive_minimum=True, maximum=100, form=Form(step=0.1)),
    Setting("logit_mean", float, 0.0, "Mean of the logit_normal draw.", tasks=FLUX_ONLY, minimum=-10, maximum=10,
            form=Form(step=0.1)),
    Setting("logit_std", float, 1.0, "Standard deviation of the logit_normal draw.", tasks=FLUX_ONLY, minimum=0,
            exclusive_minimum=True, maximum=10, form=Form(step=0.1)),
    Setting("discrete_flow_shift", float, 3.1582, "The shift of timestep_sampling shift.", tasks=FLUX_ONLY,
            minimum=0, exclusive_minimum=True, maximum=100, form=Form(step=0.1)),
    Setting("guidance_scale", float, 1.0, "FLUX.1-dev only: the guidance value the transformer is given while "
            "training (1.0 is kohya's recommendation; 3.5 is for sampling).", tasks=FLUX_ONLY, minimum=0,
            maximum=100, form=Form(step=0.1)),
    Setting("t5_max_length", int, None, "T5 tokens per caption. Default: 512 (FLUX.1-dev), 256 (FLUX.1-schnell).",
            tasks=FLUX_ONLY, optional=True, minimum=1, maximum=512),
    Setting("sample_guidance_scale", float, None, "Guidance of the sample images. Default: 3.5 (FLUX.1-dev), 0 "
            "(FLUX.1-schnell).", tasks=FLUX_ONLY, optional=True, minimum=0, maximum=100, form=Form(step=0.1)),
)


def _known_parts(v) -> str | None:
    unknown = [p for p in v["flux_lora_parts"] or () if p not in LORA_PARTS]
    if unknown:
        return f"flux_lora_parts: {unknown[0]!r} is not one of {', '.join(LORA_PARTS)}"
    return None


def _text_cache_needs_fixed_captions(v) -> str | None:
    if v["flux_text_cache"] not in ("disk", "memory"):
        return None
    varying = (["shuffle_caption"] if v["shuffle_caption"] else []) + (
        ["caption_dropout_rate"] if v["caption_dropout_rate"] > 0 else [])
    if varying:
        return (f"flux_text_cache: {v['flux_text_cache']} needs fixed captions; turn off {', '.join(varying)}, or set "
                "flux_text_cache: auto (the encoders then run every step)")
    return None


def _the_separate_files(v, family) -> str | None:
    """A Black Forest Labs transformer file holds only the transformer; a diffusers folder has every part."""
    given = [k for k in FILES if v[k] is not None]
    if family.layout == "diffusers" and given:
        return (f"{given[0]}: base_model {v['base_model']} is a diffusers folder with its own vae/, text_encoder/ "
                f"and text_encoder_2/; remove {', '.join(given)}")
    missing = [k for k in FILES if v[k] is None]
    if family.layout != "bfl" or not missing:
        return None
    what, name, where = FILES[missing[0]]
    also = f" (also missing: {', '.join(missing[1:])})" if missing[1:] else ""
    return (f"{missing[0]}: needed: base_model {v['base_model']} is a {family.name} transformer file without "
            f"{what}; set {missing[0]} to {name} ({where}){also}")


def _fits_the_packing(v, family) -> str | None:
    resolution = v["resolution"]
    if resolution % RESOLUTION_MULTIPLE == 0:
        return None
    lower = resolution // RESOLUTION_MULTIPLE * RESOLUTION_MULTIPLE
    options = " or ".join(str(n) for n in (lower, lower + RESOLUTION_MULTIPLE) if n >= 64)
    return (f"resolution {resolution} is not a multiple of {RESOLUTION_MULTIPLE}, which a Flux model needs (its "
            f"autoencoder halves the image 3 times and the transformer takes 2x2 patches); use {options}")


def _block_ranges(spec: str) -> list[tuple[int, int]]:
    """(first, last) of each number or range of a block choice (none for all and none)."""
    return [(int(lo), int(hi or lo)) for lo, hi in re.findall(r"([0-9]+)(?:-([0-9]+))?", spec)] if spec not in (
        "all", "none") else []


def _blocks_exist(v, family) -> str | None:
    doubles, singles = family.blocks
    for key, count, kind in (("flux_double_blocks", doubles, "double"), ("flux_single_blocks", singles, "single")):
        for lo, hi in _block_ranges(v[key]):
            if hi < lo:
                return f"{key}: the range {lo}-{hi} runs backwards; write {hi}-{lo}"
            if hi >= count:
                return f"{key}: block {hi} does not exist: this model has {count} {kind} blocks (0-{count - 1})"
    if v["blocks_to_swap"] != "auto" and int(v["blocks_to_swap"]) > doubles + singles:
        return (f"blocks_to_swap: {v['blocks_to_swap']} is more than the model's {doubles + singles} blocks "
                f"({doubles} double + {singles} single)")
    return None


def _swap_in_one_process(v) -> str | None:
    if v["blocks_to_swap"] != "auto" and int(v["blocks_to_swap"]) > 0 and v["num_processes"] > 1:
        return (f"blocks_to_swap: block swap runs in a single process (num_processes is {v['num_processes']}); set "
                "blocks_to_swap: 0, or num_processes: 1")
    return None


def _guidance_is_for_dev(v, family) -> str | None:
    if family.arch == "flux1-schnell" and v["guidance_scale"] != 1.0:
        return ("guidance_scale: FLUX.1-schnell has no guidance embedding, so the value does nothing; remove "
                "guidance_scale")
    return None


RULES = (
    Rule(("flux_lora_parts",), _known_parts, tasks=FLUX_ONLY),
    Rule(("flux_text_cache", "shuffle_caption", "caption_dropout_rate"), _text_cache_needs_fixed_captions,
         tasks=FLUX_ONLY),
    Rule(("blocks_to_swap", "num_processes"), _swap_in_one_process, tasks=FLUX_ONLY),
    Rule(("flux_ae", "flux_clip_l", "flux_t5xxl", "base_model"), _the_separate_files, tasks=FLUX_ONLY, family=True),
    Rule(("resolution",), _fits_the_packing, tasks=FLUX_ONLY, family=True),
    Rule(("flux_double_blocks", "flux_single_blocks", "blocks_to_swap"), _blocks_exist, tasks=FLUX_ONLY,
         family=True),
    Rule(("guidance_scale",), _guidance_is_for_dev, tasks=FLUX_ONLY, family=True),
)
