"""Block control for the SD UNet: a learning-rate factor and a rank per block (kohya's `down_lr_weight`,
`mid_lr_weight`, `up_lr_weight`, `block_dims`, `block_alphas`, `conv_block_dims`, `conv_block_alphas`).

Blocks are numbered as the hosts number the LDM layout: in0..in11, mid, out0..out11 on SD1.x/SD2.x, in0..in8,
mid, out0..out8 on SDXL. How many values a list needs depends on the model's UNet, which the trainer reads when
it loads it (shared/sd/blocks.py checks the counts there, before anything is written)."""

from .setting import SD_ONLY, Rule, Setting

SECTION = "Block control (SD)"
SHAPES = r"(cosine|sine|linear|reverse_linear|zeros)(\+[0-9]*\.?[0-9]+)?"
SHAPES_HELP = "cosine, sine, linear, reverse_linear or zeros, optionally +offset (e.g. sine+0.5)"


def _weights(name: str, help: str) -> Setting:
    return Setting(name, list, None, help, tasks=SD_ONLY, optional=True, items=float, minimum=0, pattern=SHAPES,
                   pattern_help=SHAPES_HELP)


def _dims(name: str, help: str, items: type = int) -> Setting:
    return Setting(name, list, None, help, tasks=SD_ONLY, optional=True, items=items, minimum=0)


SETTINGS = (
    _weights("down_lr_weight", "Learning-rate factor per input block, in0 first (12 values; SDXL 9), or a shape. "
             "0 leaves a block untrained."),
    Setting("mid_lr_weight", float, None, "Learning-rate factor of the middle block.", tasks=SD_ONLY, optional=True,
            minimum=0),
    _weights("up_lr_weight", "Learning-rate factor per output block, out0 first (12 values; SDXL 9), or a shape."),
    _dims("block_dims", "Rank per block: in.., mid, out.. (25 values; SDXL 19); 0 leaves a block out. Default: "
          "lora_rank everywhere."),
    _dims("block_alphas", "Alpha per block, as block_dims. Default: each block's rank.", float),
    _dims("conv_block_dims", "LoCon: the 3x3 convs' rank per block, as block_dims (needs conv_rank > 0)."),
    _dims("conv_block_alphas", "LoCon: the 3x3 convs' alpha per block. Default: each block's conv rank.", float),
)


def _pairs_fit(v) -> str | None:
    if v["block_alphas"] is not None and v["block_dims"] is None:
        return "block_alphas needs block_dims (the ranks they go with)"
    if v["conv_block_alphas"] is not None and v["conv_block_dims"] is None:
        return "conv_block_alphas needs conv_block_dims (the ranks they go with)"
    if v["conv_block_dims"] is not None and not v["conv_rank"]:
        return "conv_block_dims sets LoCon's conv ranks: set conv_rank > 0 too, or remove conv_block_dims"
    return None


RULES = (Rule(("block_alphas", "conv_block_alphas", "conv_block_dims", "block_dims", "conv_rank"), _pairs_fit,
              tasks=SD_ONLY),)
