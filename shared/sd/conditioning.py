"""What each SD family's UNet is conditioned on.

SD1.x: CLIP-L's last hidden state. SD2.x: OpenCLIP-H's last hidden state (diffusers' SD2 encoder
already stops one block early). SDXL: CLIP-L's and OpenCLIP-bigG's penultimate hidden states side
by side, plus bigG's pooled projection and six numbers (original size, crop corner, target size).
"""

from __future__ import annotations


def encode_text(model, input_ids: list):
    """(encoder_hidden_states, pooled text embeds or None) for one id tensor per tokenizer."""
    import torch

    device = next(model.unet.parameters()).device
    if not model.is_sdxl:
        encoder = model.text_encoders[0]
        return encoder(input_ids[0].to(device))[0], None
    states, pooled = [], None
    for encoder, ids in zip(model.text_encoders, input_ids):
        out = encoder(ids.to(device), output_hidden_states=True)
        states.append(out.hidden_states[-2])
        if hasattr(out, "text_embeds"):
            pooled = out.text_embeds
    return torch.cat(states, dim=-1), pooled


def sdxl_time_ids(original_sizes, crops, target_sizes, device=None):
    """[batch, 6]: (orig h, orig w, crop top, crop left, target h, target w) per image."""
    import torch

    rows = [[*o, *c, *t] for o, c, t in zip(original_sizes, crops, target_sizes)]
    return torch.tensor(rows, dtype=torch.float32, device=device)


def unet_kwargs(model, pooled, time_ids) -> dict:
    if not model.is_sdxl:
        return {}
    return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
