"""The LoRA tool jobs (`submit` with kind `lora_info`, `lora_resize`, `lora_merge`, `lora_extract` or
`lora_convert`): the options of each, named as the keyword arguments of the functions in
shared/sd/lora_tools/ (and the `python -m daemon lora TOOL` options, `--out` being `out_dir`)."""

from pathlib import Path

from .output import NAME_HELP, NAME_PATTERN
from .setting import Form, Rule, Setting

SECTION = "LoRA tool jobs"
TOOLS = ("info", "resize", "merge", "extract", "convert")
KINDS = tuple(f"lora_{tool}" for tool in TOOLS)
_HIDDEN = Form("hidden")


def _option(kind: str, name: str, type_, default, help: str, **rule) -> Setting:
    return Setting(name, type_, default, help, tasks=frozenset({kind}), form=_HIDDEN, **rule)


def _file(kind: str, help: str = "The LoRA file (.safetensors).") -> Setting:
    return _option(kind, "file", Path, None, help, required=True, path="read", exists="file")


def _output(kind: str) -> tuple[Setting, ...]:
    return (
        _option(kind, "out_dir", Path, None, "The folder to write into (default: the input's folder). An existing "
                "file is never replaced: a taken name gets _2, _3, ...", optional=True, path="write"),
        _option(kind, "name", str, None, "The output's file name without .safetensors (default: from the input's "
                "name).", optional=True, pattern=NAME_PATTERN, pattern_help=NAME_HELP),
    )


def _model_config(kind: str) -> Setting:
    return _option(kind, "model_config", Path, None, "A diffusers-format config folder for a model of non-standard "
                   "size (as the training key model_config).", optional=True, path="read", exists="dir")


def _rank(kind: str, help: str, **rule) -> Setting:
    return _option(kind, "rank", int, None, help, minimum=1, maximum=4096, **rule)


SETTINGS: dict[str, tuple[Setting, ...]] = {
    "lora_info": (_file("lora_info"),),
    "lora_resize": (
        _file("lora_resize"),
        _rank("lora_resize", "The new rank of every module (or give energy).", optional=True),
        _option("lora_resize", "energy", float, None, "Per module, the smallest rank keeping this fraction of the "
                "energy (e.g. 0.9; or give rank).", optional=True, minimum=0, exclusive_minimum=True, maximum=1),
        *_output("lora_resize"),
    ),
    "lora_merge": (
        _option("lora_merge", "loras", list, None, "The LoRA files, each `PATH` or `PATH:WEIGHT` (default weight 1).",
                required=True, min_items=1),
        _option("lora_merge", "base", Path, None, "A base checkpoint: write it with the LoRAs merged in (without: "
                "merge several LoRAs into one).", optional=True, path="read", exists="file"),
        _option("lora_merge", "mode", str, "concat", "LoRAs into one: concat stacks the ranks (exact; LoRA/LoCon), "
                "svd factorises the weighted sum to rank.", choices=("concat", "svd")),
        _rank("lora_merge", "The rank for mode svd.", optional=True),
        _model_config("lora_merge"),
        *_output("lora_merge"),
    ),
    "lora_extract": (
        _option("lora_extract", "base", Path, None, "The base checkpoint.", required=True, path="read",
                exists="file"),
        _option("lora_extract", "tuned", Path, None, "The fine-tuned checkpoint.", required=True, path="read",
                exists="file"),
        _rank("lora_extract", "The LoRA rank.", required=True),
        _option("lora_extract", "conv_rank", int, 0, "Also extract the ResBlock convs at this rank (LoCon; 0: no).",
                minimum=0, maximum=4096),
        _option("lora_extract", "text_encoder", bool, True, "Extract the text encoders' modules too."),
        _option("lora_extract", "min_diff", float, 1e-5, "Leave out modules whose weights differ by less than this.",
                minimum=0),
        _model_config("lora_extract"),
        *_output("lora_extract"),
    ),
    "lora_convert": (
        _file("lora_convert"),
        _option("lora_convert", "to", str, None, "The layout to write: diffusers (PEFT names) or kohya.",
                required=True, choices=("diffusers", "kohya")),
        _option("lora_convert", "arch", str, None, "The model family when the file does not say.", optional=True,
                choices=("sd1", "sd2", "sdxl")),
        _model_config("lora_convert"),
        *_output("lora_convert"),
    ),
}


def _rank_or_energy(v) -> str | None:
    if (v["rank"] is None) == (v["energy"] is None):
        return "resize: give exactly one of rank (the new rank) or energy (the share of the energy to keep)"
    return None


def _merge_plan(v) -> str | None:
    if v["base"] is None and len(v["loras"]) < 2:
        return "merge: name at least two LoRA files to merge into one, or base to merge into a checkpoint"
    if v["base"] is not None and (v["mode"] != "concat" or v["rank"] is not None):
        return "merge: mode and rank are for merging LoRAs into one; leave them out with base"
    if v["base"] is None and v["mode"] == "svd" and v["rank"] is None:
        return "merge: mode svd needs rank"
    return None


RULES: dict[str, tuple[Rule, ...]] = {
    "lora_resize": (Rule(("rank", "energy"), _rank_or_energy, tasks=frozenset({"lora_resize"})),),
    "lora_merge": (Rule(("loras", "base", "mode", "rank"), _merge_plan, tasks=frozenset({"lora_merge"})),),
}
