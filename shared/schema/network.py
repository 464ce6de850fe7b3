"""The adapter's type on SD models: LoRA (with LoCon and DoRA), or LoHa / LoKr from the LyCORIS family, and the
LyCORIS options."""

from .setting import SD_ONLY, Rule, Setting

SECTION = "LoRA type (LyCORIS)"
LORA_TYPES = ("lora", "loha", "lokr")

SETTINGS = (
    Setting("lora_type", str, "lora", "lora: LoRA (LoCon with conv_rank, DoRA with use_dora). loha (Hadamard "
            "product of two low-rank pairs) and lokr (Kronecker product) from lycoris-lora, in the LyCORIS layout "
            "AUTOMATIC1111, Forge and ComfyUI load; lora_rank / lora_alpha (and conv_rank / conv_alpha) size them.",
            tasks=SD_ONLY, choices=LORA_TYPES),
    Setting("lycoris_factor", int, -1, "lokr: split each dimension into a factor near this and the rest (-1: as "
            "close to a square root as it can).", tasks=SD_ONLY, minimum=-1, maximum=65536),
    Setting("lycoris_decompose_both", bool, False, "lokr: factorise the small Kronecker half too.", tasks=SD_ONLY),
    Setting("lycoris_use_tucker", bool, False, "loha with conv_rank > 0: a Tucker core on the 3x3 convs (not for "
            "lokr: ComfyUI cannot apply a Tucker LoKr).", tasks=SD_ONLY),
    Setting("lycoris_rank_dropout", float, 0.0, "loha / lokr: dropout on the rank dimension while training "
            "(lora_dropout does not apply to them).", tasks=SD_ONLY, minimum=0, maximum=1, exclusive_maximum=True),
    Setting("lycoris_module_dropout", float, 0.0, "loha / lokr: chance of skipping a whole module at a step.",
            tasks=SD_ONLY, minimum=0, maximum=1, exclusive_maximum=True),
)


def _factor_is_minus_one_or_positive(v) -> str | None:
    if v["lycoris_factor"] == 0:
        return "lycoris_factor must be -1 (automatic) or at least 1, got 0"
    return None


def _lycoris_options_fit(v) -> str | None:
    kind = v["lora_type"]
    if kind != "lora" and v["use_dora"]:
        return f"use_dora applies to lora_type: lora, not {kind}; turn off use_dora or use lora_type: lora"
    if v["lycoris_use_tucker"]:
        if kind == "lokr":
            return ("lycoris_use_tucker: a LoKr with Tucker convs does not load in ComfyUI; use it with lora_type: "
                    "loha, or turn it off")
        if kind == "lora":
            return "lycoris_use_tucker applies to lora_type: loha; set lora_type: loha or turn it off"
        if not v["conv_rank"]:
            return "lycoris_use_tucker works on the 3x3 convs: set conv_rank > 0 too, or turn it off"
    lokr_only = [k for k in ("lycoris_decompose_both",) if v[k]] + (["lycoris_factor"] if v["lycoris_factor"] != -1
                                                                    else [])
    if lokr_only and kind != "lokr":
        return f"{lokr_only[0]} applies to lora_type: lokr, not {kind}; set lora_type: lokr or remove it"
    dropouts = [k for k in ("lycoris_rank_dropout", "lycoris_module_dropout") if v[k]]
    if dropouts and kind == "lora":
        return (f"{dropouts[0]} applies to lora_type: loha or lokr; LoRA's own dropout is lora_dropout")
    return None


RULES = (
    Rule(("lycoris_factor",), _factor_is_minus_one_or_positive, tasks=SD_ONLY),
    Rule(("lora_type", "use_dora", "lycoris_use_tucker", "lycoris_factor", "lycoris_decompose_both",
          "lycoris_rank_dropout", "lycoris_module_dropout"), _lycoris_options_fit, tasks=SD_ONLY),
)
