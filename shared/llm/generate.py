"""Greedy generation for sample prompts: the same rendering as the training data, stop at EOS."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    stopped: bool  # ended with an EOS token (rather than running into max_new_tokens)


def stop_ids(model, tokenizer) -> list[int]:
    """EOS ids to stop at: the tokenizer's and the generation config's (some chat models have two)."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(extra, int):
        ids.add(extra)
    elif isinstance(extra, (list, tuple)):
        ids.update(extra)
    return sorted(i for i in ids if i is not None)


def greedy(model, tokenizer, prompt_ids: list[int], max_new_tokens: int = 64, use_cache: bool | None = None) -> Generation:
    """Greedy continuation of `prompt_ids`. `use_cache=None` follows the model config (remote-code
    models without KV-cache support set `use_cache: false` there)."""
    import torch

    device = next(model.parameters()).device
    eos = stop_ids(model, tokenizer)
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    if use_cache is None:
        use_cache = bool(getattr(getattr(model, "config", None), "use_cache", True))
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=use_cache,
        )
    new = out[0, input_ids.shape[1] :].tolist()
    stopped = bool(new) and new[-1] in eos
    return Generation(tokenizer.decode(new, skip_special_tokens=True), new, stopped)
