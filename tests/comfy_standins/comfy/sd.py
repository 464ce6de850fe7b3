"""Stand-in for comfy.sd.load_lora_for_models: records what it was asked to apply."""

from __future__ import annotations

applied: list[dict] = []


def load_lora_for_models(model, clip, lora, strength_model, strength_clip):
    applied.append({"model": model, "clip": clip, "keys": sorted(lora), "strength_model": strength_model,
                    "strength_clip": strength_clip})
    new_model = None if model is None else ("patched", model, strength_model)
    new_clip = None if clip is None else ("patched", clip, strength_clip)
    return new_model, new_clip
