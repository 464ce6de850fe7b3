"""The cheaper CPU LoRA dropout draws the same kind of mask as nn.Dropout: keeps 1 - p of the elements,
scales them by 1 / (1 - p), is the identity in eval mode, follows the global seed, keeps only its
one-byte mask for the backward pass, and replaces peft's dropout in every LoRA layer."""

import torch
from torch import nn

from shared.llm.dropout import FastDropout, use_fast_dropout


def test_fast_dropout_keeps_one_minus_p_scaled_and_follows_the_seed():
    x = torch.ones(1000, 1001, dtype=torch.bfloat16)
    layer = FastDropout(0.1).train()
    torch.manual_seed(0)
    y = layer(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.002  # 1 M draws: within 0.2 % of the keep rate
    assert torch.all(y[kept] == torch.tensor(1 / 0.9, dtype=torch.bfloat16))
    torch.manual_seed(0)
    assert torch.equal(layer(x), y)  # the same seed, the same mask
    assert not torch.equal(layer(x), y)  # and a new mask on the next call
    # rows and columns are not correlated: each row keeps about 90 %
    assert kept.float().mean(dim=1).min() > 0.85
    layer.eval()
    assert layer(x) is x
    # the gradient is the mask times the scale
    z = torch.randn(64, 33, requires_grad=True)
    out = FastDropout(0.5).train()(z)
    out.sum().backward()
    torch.testing.assert_close(z.grad, (out != 0).float() * 2.0)


def test_fast_dropout_keeps_one_byte_an_element_for_the_backward_pass():
    # what the memory plan counts for it (shared/llm/memory.py DROPOUT): the mask, no copy of the input
    saved = []
    x = torch.randn(96, 130, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = FastDropout(0.25).train()(x)
    assert sum(t.numel() * t.element_size() for t in saved) == x.numel()
    y.backward(torch.full_like(y, 3.0))
    assert x.grad.dtype == torch.bfloat16
    assert torch.equal(x.grad, torch.where(y != 0, 4.0, 0.0).to(torch.bfloat16))  # 3 x 1 / (1 - 0.25)


def test_every_lora_layer_gets_the_fast_dropout(tiny_llama):
    from peft import LoraConfig, get_peft_model

    from shared.llm.model import load_causal_lm

    model = get_peft_model(load_causal_lm(tiny_llama), LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    assert use_fast_dropout(model) == 4  # 2 layers x 2 modules
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout) and m.p == 0.1]
    assert len(dropouts) == 4 and all(type(m) is FastDropout for m in dropouts)
    assert use_fast_dropout(model) == 0  # once
