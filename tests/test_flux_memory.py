"""Flux memory levers on the CPU with the tiny model (issue 19): fp8 base storage computed in the
activations' dtype, diffusers' gradient checkpointing, block swap (equal losses to 1e-4), the text
encoder output cache, and the automatic choice of levers."""

from __future__ import annotations

import pytest
import torch

from shared.fixtures.tiny_flux import build_tiny_flux_components
from shared.flux import conditioning as C
from shared.flux import flow_matching as FM
from shared.flux.block_swap import BlockSwap
from shared.flux.fp8 import FP8, Fp8Linear, store_in_fp8, weight_bytes
from shared.flux.lora import inject_flux_lora, select_targets
from shared.flux.memory import plan_memory
from shared.flux.text_cache import TextCache, free_text_encoders


def _fixed_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 16, 8, 8, generator=g)
    text = C.FluxText(torch.randn(2, 6, 32, generator=g), torch.randn(2, 32, generator=g), torch.zeros(6, 3))
    return latents, text


def _lora_transformer(seed=0, fp8=False):
    transformer = build_tiny_flux_components("dev", seed=seed)[0]
    params = inject_flux_lora(transformer, select_targets(transformer.config), rank=4, alpha=4.0, init="gaussian")
    if fp8:
        store_in_fp8(transformer)
    return transformer, params


def _train(transformer, params, steps=3, lr=1e-2, same_noise=False):
    """Losses and final LoRA weights of a few AdamW steps on a fixed batch (each step's noise and
    sigmas from its own seeds; with same_noise every step draws the same ones)."""
    latents, text = _fixed_batch()
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for step in range(steps):
        gens = [torch.Generator().manual_seed((0 if same_noise else 100 * step) + i) for i in range(2)]
        loss = FM.flow_matching_loss(transformer, latents, text, gens, timestep_sampling="sigmoid")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, [p.detach().clone() for p in params]


def test_fp8_storage_keeps_block_weights_in_fp8_and_lora_in_fp32():
    transformer, params = _lora_transformer(fp8=True)
    to_q = transformer.transformer_blocks[0].attn.to_q
    assert isinstance(to_q.base_layer, Fp8Linear) and to_q.base_layer.weight.dtype == FP8
    assert to_q.lora_A["default"].weight.dtype == torch.float32
    assert transformer.x_embedder.weight.dtype == torch.float32  # outside the blocks: kept
    x = torch.randn(3, 64)
    want = torch.nn.functional.linear(x, to_q.base_layer.weight.float(), to_q.base_layer.bias)
    assert torch.allclose(to_q.base_layer(x), want)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # computed in bf16 on the way through
        assert to_q.base_layer(x.bfloat16()).dtype == torch.bfloat16
    losses, _ = _train(transformer, params, steps=2)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(p.grad is None for n, p in transformer.named_parameters() if "lora_" not in n)


def test_fp8_halves_the_block_weights():
    bf16 = build_tiny_flux_components("dev")[0].to(torch.bfloat16)
    fp8 = build_tiny_flux_components("dev")[0].to(torch.bfloat16)
    n = store_in_fp8(fp8)
    assert n == 2 * 14 + 2 * 6  # every diffusers Linear of the double (14) and single (6) blocks
    blocks = lambda m: weight_bytes(m.transformer_blocks) + weight_bytes(m.single_transformer_blocks)  # noqa: E731
    assert blocks(fp8) < 0.55 * blocks(bf16)


def test_lora_injected_into_an_fp8_model_is_fp32_and_initialised_in_fp32():
    transformer = build_tiny_flux_components("dev")[0]
    store_in_fp8(transformer)
    inject_flux_lora(transformer, select_targets(transformer.config), rank=4, alpha=4.0)
    a = transformer.transformer_blocks[0].attn.to_q.lora_A["default"].weight
    assert a.dtype == torch.float32
    assert not torch.equal(a, a.to(FP8).float())  # not values that went through fp8


def test_the_tiny_flux_lora_loss_falls_on_a_fixed_batch():
    transformer, params = _lora_transformer()
    losses, _ = _train(transformer, params, steps=15, lr=5e-3, same_noise=True)
    assert losses[-1] < 0.85 * losses[0] and all(b < a for a, b in zip(losses, losses[1:])), losses


def test_gradient_checkpointing_gives_the_same_losses():
    plain, p1 = _lora_transformer()
    ckpt, p2 = _lora_transformer()
    ckpt.enable_gradient_checkpointing()
    ckpt.train()
    plain.train()
    l1, w1 = _train(plain, p1)
    l2, w2 = _train(ckpt, p2)
    assert max(abs(a - b) for a, b in zip(l1, l2)) < 1e-5
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(w1, w2))


@pytest.mark.parametrize("count, checkpointing, fp8", [(4, False, False), (2, True, False), (3, False, True)])
def test_block_swap_gives_the_same_losses_as_no_swap(count, checkpointing, fp8):
    plain, p1 = _lora_transformer(fp8=fp8)
    swapped, p2 = _lora_transformer(fp8=fp8)
    for model in (plain, swapped):
        model.train()
        if checkpointing:
            model.enable_gradient_checkpointing()
    # on this CPU the "offload place" is float64: every block must be brought back to its own dtype
    swap = BlockSwap(swapped, count, device="cpu", offload_dtype=torch.float64).install()
    blocks = swap.blocks
    assert len(blocks) == count and blocks[-1] is swapped.single_transformer_blocks[-1]
    frozen = [p for p in blocks[0].parameters() if not p.requires_grad]
    assert all(p.dtype == torch.float64 for p in frozen)
    l1, w1 = _train(plain, p1)
    l2, w2 = _train(swapped, p2)
    assert max(abs(a - b) for a, b in zip(l1, l2)) < 1e-4, (l1, l2)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(w1, w2))
    assert swap.moves["in"] == 2 * count * 3  # each swapped block came in for its forward and its backward
    assert swap.moves["out"] == swap.moves["in"]
    assert all(p.dtype == torch.float64 for p in frozen)  # and left again
    lora = [p for p in blocks[0].parameters() if p.requires_grad]
    assert lora and all(p.dtype == torch.float32 for p in lora)  # trained weights never move
    with torch.no_grad():  # sampling through swapped blocks works too
        latents, text = _fixed_batch()
        pred = FM.predict(swapped, latents, torch.tensor([0.5, 0.5]), text)
        assert torch.allclose(pred, FM.predict(plain, latents, torch.tensor([0.5, 0.5]), text), atol=1e-4)


def test_block_swap_counts_are_checked():
    transformer = build_tiny_flux_components("dev")[0]
    with pytest.raises(ValueError, match="outside 0-4"):
        BlockSwap(transformer, 5, device="cpu")


def test_text_outputs_are_cached_to_disk_and_reused(flux_model, tmp_path, monkeypatch):
    captions = ["a photo of sks dog", "a red car", "a photo of sks dog"]
    cache = TextCache("fingerprint-1", 512, tmp_path)
    cache.fill(flux_model, captions)
    assert cache.new == 2
    direct = C.encode_text(flux_model, ["a red car"])
    again = TextCache("fingerprint-1", 512, tmp_path)
    got = again.get("a red car")
    assert again.hits == 1 and torch.allclose(got.prompt_embeds, direct.prompt_embeds, atol=1e-6)
    batch = again.batch(["a red car", "a photo of sks dog"])
    assert batch.prompt_embeds.shape == (2, 512, 32) and batch.text_ids.shape == (512, 3)
    other = TextCache("fingerprint-2", 512, tmp_path)
    assert other.get("a red car") is None  # other encoders: never served
    entry = next((tmp_path / "fingerprint-1"[:16]).glob("*.safetensors"))
    entry.write_bytes(b"broken")
    fresh = TextCache("fingerprint-1", 512, tmp_path)
    assert sum(fresh.get(c) is None for c in captions[:2]) == 1  # the damaged entry is encoded again


def test_freeing_the_text_encoders_drops_their_weights(tiny_flux):
    from shared.flux.base_model import load_flux_model

    model = load_flux_model(tiny_flux["comfy"], t5_tokenizer=tiny_flux["t5_tokenizer"],
                            model_config=tiny_flux["model_config"], dtype=torch.float32)
    free_text_encoders(model)
    assert all(p.device.type == "meta" for p in model.text_encoder_2.parameters())


def test_automatic_levers_follow_the_card():
    assert plan_memory(None) == plan_memory(None, fp8_base=False, blocks_to_swap=0, gradient_checkpointing=False)
    big, card24, card16, card12 = (plan_memory(v) for v in (80, 24, 16, 12))
    assert not big.fp8_base and big.blocks_to_swap == 0 and big.gradient_checkpointing
    assert card24.fp8_base and card24.estimate_gb <= 0.9 * 24
    assert card16.blocks_to_swap > 0 and card12.blocks_to_swap > card16.blocks_to_swap
    assert card12.estimate_gb <= 0.9 * 12
    assert plan_memory(12, fp8_base=False, blocks_to_swap=5).blocks_to_swap == 5
