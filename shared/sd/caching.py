"""The text-encoder output cache of an SD job: the conditioning of each distinct caption, when the text
encoders are frozen and captions are fixed; the task then frees the encoders. (The latent cache is
shared with Flux: shared/images/latent_cache.py.)
"""

from __future__ import annotations

from shared.images.dataset import tokenize
from shared.sd.conditioning import encode_text


def build_text_cache(model, data, device, reporter, prompts: list[str] = ()) -> dict:
    """caption -> (hidden states, pooled or None) for every distinct fixed caption and for `prompts`
    (what the job will render: samples, the preview, the empty negative prompt), so no text encoder
    runs after this."""
    import torch

    cache = {}
    captions = sorted({data.fixed_caption(i) for i in range(len(data.items))} | set(prompts))
    with torch.no_grad():
        for caption in captions:
            ehs, pooled = encode_text(model, tokenize(model.tokenizers, [caption]))
            cache[caption] = (ehs[0].cpu(), None if pooled is None else pooled[0].cpu())
    reporter.log(f"Text-encoder cache: {len(captions)} captions and prompts encoded")
    return cache
