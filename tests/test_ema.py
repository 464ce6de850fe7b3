"""EMA of the LoRA weights (issue 20): the shadows differ from the trained weights, and an export inside
`exported()` writes the shadows, after which the trained weights are back."""

import pytest
import torch

from shared.ema import AdapterEMA
from shared.fixtures.tiny_sd import build_tiny_sd15_components
from shared.images.lora import inject_lora, kohya_unet_targets, lora_modules
from shared.sd.kohya_export import model_lora_tensors


def test_ema_weights_differ_and_are_the_exported_ones():
    unet, _, _ = build_tiny_sd15_components(0)
    torch.manual_seed(0)
    params = inject_lora(unet, kohya_unet_targets(unet), rank=4, alpha=4, dropout=0.0, init="default")
    ema = AdapterEMA(params, decay=0.9)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    g = torch.Generator().manual_seed(0)
    latents, target = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    cond = torch.randn(2, 77, 32, generator=g)
    for _ in range(6):
        loss = torch.nn.functional.mse_loss(unet(latents, torch.tensor([10, 900]), cond).sample, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.step()
    raw = [p.detach().clone() for p in params]
    shadow = ema.shadow()
    assert all(not torch.equal(s, r) for s, r in zip(shadow, raw))  # every tensor: the average lags the weights
    assert all(torch.isfinite(s).all() for s in shadow)

    raw_file = model_lora_tensors("sd1", unet)
    with ema.exported():
        ema_file = model_lora_tensors("sd1", unet)
    name, down, _, _ = next(iter(lora_modules(unet)))
    key = "lora_unet_" + name.replace(".", "_") + ".lora_down.weight"
    index = next(i for i, p in enumerate(params) if p is down)
    assert torch.equal(ema_file[key], shadow[index].half())
    assert not torch.equal(ema_file[key], raw_file[key])
    assert all(torch.equal(p, r) for p, r in zip(params, raw))  # trained weights restored


def test_ema_follows_the_decay_rule_and_resumes():
    w = torch.nn.Parameter(torch.zeros(3))
    ema = AdapterEMA([w], decay=0.5, update_every=2)
    expected = torch.zeros(3)
    updates = 0
    for step in range(1, 9):
        with torch.no_grad():
            w.fill_(float(step))
        ema.step()
        if step % 2 == 0:
            updates += 1
            # diffusers' EMAModel: decay min(0.5, (1 + n) / (10 + n)), n = updates - 1, 0 on the first
            n = updates - 1
            decay = 0.0 if n <= 0 else min(0.5, (1 + n) / (10 + n))
            expected = decay * expected + (1 - decay) * w.detach()
    assert torch.allclose(ema.shadow()[0], expected)
    again = AdapterEMA([w], decay=0.5, update_every=2)
    again.load_state_dict(ema.state_dict())
    assert torch.equal(again.shadow()[0], ema.shadow()[0]) and again._steps == 8
    with pytest.raises(ValueError, match="ema_decay"):
        AdapterEMA([w], decay=1.0)
