"""The answer-token loss without full-vocabulary logits: the same value and gradients as the textbook
full-logits cross-entropy, far less memory for a large vocabulary, and the full-logits path kept for a
model whose logits are more than its head's product."""

from __future__ import annotations

import pytest
import torch

from shared.llm.data import IGNORE
from shared.llm.loss import AnswerLoss, chunked_cross_entropy, token_loss


def lora_model(folder):
    from peft import LoraConfig, get_peft_model

    from shared.llm.model import load_causal_lm

    model = load_causal_lm(folder)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                             init_lora_weights="gaussian"))
    torch.manual_seed(1)
    with torch.no_grad():  # B = 0 at init would give the LoRA A matrices no gradient at all
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def batch(vocab: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 20), generator=g)
    labels = ids.clone()
    labels[:, :8] = IGNORE  # a prompt
    labels[1, 15:] = IGNORE  # padding
    labels[2, 5:12] = ids[2, 5:12]  # the prompt of row 2 is trained in part
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_chunked_loss_equals_the_full_logits_loss_in_value_and_gradient(tiny_llama):
    model = lora_model(tiny_llama)
    model.train()
    data = batch(model.config.vocab_size)

    full_sum, full_count = token_loss(model(input_ids=data["input_ids"], attention_mask=data["attention_mask"],
                                            use_cache=False).logits, data["labels"])
    (full_sum / full_count).backward()
    expected = grads(model)
    model.zero_grad(set_to_none=True)

    vocab = model.config.vocab_size
    loss = AnswerLoss(model, torch.device("cpu"), chunk_elements=5 * vocab)  # 5 tokens a chunk: several chunks
    assert loss.chunked and "chunks of 5 tokens" in loss.note
    chunked_sum, chunked_count = loss(model, data)
    (chunked_sum / chunked_count).backward()
    assert int(chunked_count) == int(full_count) == int((data["labels"][:, 1:] != IGNORE).sum())
    torch.testing.assert_close(chunked_sum, full_sum, rtol=1e-5, atol=1e-5)
    got = grads(model)
    assert got.keys() == expected.keys() and len(got) == 12
    for name in expected:
        assert expected[name].abs().max() > 0, name  # every LoRA weight gets a gradient to compare
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)


class LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """The largest tensor any operation makes, forward and backward (views of existing ones aside)."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def test_chunked_loss_needs_far_less_memory_for_a_large_vocabulary():
    torch.manual_seed(0)
    vocab, tokens, width = 32_000, 256, 64
    head = torch.nn.Linear(width, vocab, bias=False).requires_grad_(False)
    start = torch.randn(tokens, width, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))

    def measure(chunk_elements):
        saved = []

        def keep(t):
            saved.append(t.numel() * t.element_size())
            return t

        with LargestTensor() as largest:
            with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
                loss = chunked_cross_entropy(head, start * 1.0, targets, chunk_elements)
            loss.backward()
        grad, start.grad = start.grad, None
        return loss.detach(), grad, sum(saved), largest.largest

    full_loss, full_grad, full_saved, full_largest = measure(vocab * tokens)  # one chunk: the textbook loss
    loss, grad, saved, largest = measure(1 << 20)  # 32 tokens a chunk
    torch.testing.assert_close(loss, full_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, full_grad, rtol=1e-5, atol=1e-7)
    logits_bytes = tokens * vocab * 4
    assert full_saved >= logits_bytes and full_largest >= logits_bytes  # the full fp32 logits, kept for backward
    assert saved < logits_bytes / 100  # chunked: only the hidden states are kept between the passes
    assert largest <= logits_bytes / 8  # and no operation ever makes more than one chunk's logits


def test_a_model_that_changes_its_logits_after_the_head_keeps_the_full_logits(tmp_path):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=2.0)
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config)
    loss = AnswerLoss(model, torch.device("cpu"))
    assert not loss.chunked and "full logits" in loss.note
    data = batch(97)
    expected, _ = token_loss(model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits,
                             data["labels"])
    got, _ = loss(model, data)
    torch.testing.assert_close(got, expected)
    # control: the same model without softcapping has its head applied in chunks
    config.final_logit_softcapping = None
    assert AnswerLoss(Gemma2ForCausalLM(config), torch.device("cpu")).chunked


@pytest.mark.parametrize("padding_only", [True, False])
def test_a_batch_without_answer_tokens_gives_zero_that_still_backpropagates(tiny_llama, padding_only):
    model = lora_model(tiny_llama)
    data = batch(model.config.vocab_size)
    data["labels"][:] = IGNORE
    if not padding_only:
        data["labels"][:, 0] = 5  # a label on the first position is never predicted
    total, count = AnswerLoss(model, torch.device("cpu"))(model, data)
    assert int(count) == 0 and float(total.detach()) == 0.0
    total.backward()  # joins the graph: a rank with such a batch still takes part in the gradient exchange


def test_bypassing_the_head_restores_a_forward_hooked_on_the_instance():
    from shared.llm.loss import head_bypassed

    head = torch.nn.Linear(4, 6)
    plain = head.forward
    head.forward = lambda x: plain(x) * 2  # what accelerate's hooks do to a dispatched module
    hooked = head.forward
    x = torch.randn(2, 4)
    with head_bypassed(head):
        assert head(x) is x
    assert head.forward is hooked
    torch.testing.assert_close(head(x), plain(x) * 2)
    del head.forward
    with head_bypassed(head):
        pass
    assert "forward" not in head.__dict__
