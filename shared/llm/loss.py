"""The LLM training loss (next-token cross-entropy on the labelled tokens) and the held-out evaluation.

Where LLM training memory peaks is the output head: full-vocabulary logits for every position of the
batch, upcast to fp32 for the cross-entropy (B x T x V x 4 bytes, and as much again for its softmax
kept for the backward pass; 4 x 1024 tokens of a 152 k vocabulary are 2.5 GB each). `AnswerLoss`
never builds them: it runs the model with its head bypassed (so `.logits` holds the hidden states the
head would read), keeps only the positions whose next token is trained (labels != -100: prompts and
padding need no logits at all), and applies the head and the cross-entropy chunk by chunk under
`torch.utils.checkpoint`, so only one chunk's logits exist at a time, forward and backward (the
backward recomputes a chunk's logits from its hidden states). The sum is the same as the unchunked
loss to float rounding; `tests/test_llm_loss.py` checks value and gradients.

A library for this exists for CUDA (Liger's fused linear cross-entropy, Apple's cut-cross-entropy:
Triton kernels, nothing for the CPU), and neither transformers nor peft chunks the loss; this works
on every device with any head module (LoRA on the head included), at the cost of one recomputed head
product per chunk, which only large vocabularies pay (a batch fitting one chunk is not checkpointed).

Whether bypassing the head is exact is checked once on the loaded model (`head_probe`): a model that
does more to its logits than the head's product (softcapping, a scale) keeps the full-logits path.
"""

from __future__ import annotations

import contextlib
import math

from shared.llm.data import IGNORE, Sample, collate

# Logits elements per chunk (32 MiB in fp32): large enough for efficient matrix products, small next
# to the activations of any model that has a vocabulary big enough to need chunking.
CHUNK_ELEMENTS = 1 << 23


def token_loss(logits, labels):
    """(sum of next-token cross-entropy over labelled positions, number of those positions), from full
    logits: the reference the chunked loss is checked against, and the path for models whose head
    cannot be bypassed."""
    import torch.nn.functional as F

    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return total, (shift_labels != IGNORE).sum()


def _identity(hidden, *args, **kwargs):
    return hidden


@contextlib.contextmanager
def head_bypassed(head):
    """Inside: the head module passes its input through, so a model's `.logits` are its hidden states."""
    previous = head.__dict__.get("forward")  # accelerate's hooks wrap `forward` on the instance
    head.forward = _identity
    try:
        yield
    finally:
        if previous is not None:
            head.forward = previous
        else:
            del head.forward  # back to the class's forward (a LoRA layer's included)


def _chunk_loss(head, hidden, targets):
    import torch.nn.functional as F

    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunked_cross_entropy(head, hidden, targets, chunk_elements: int = CHUNK_ELEMENTS):
    """Sum of cross-entropy of `head(hidden)` against `targets` ([N, H] and [N]), one chunk of rows at
    a time, each recomputed in the backward pass."""
    from torch.utils.checkpoint import checkpoint

    vocab = head.weight.shape[0]
    rows = max(1, chunk_elements // vocab)
    if len(hidden) <= rows:
        return _chunk_loss(head, hidden, targets)
    total = None
    for start in range(0, len(hidden), rows):
        part = checkpoint(_chunk_loss, head, hidden[start:start + rows], targets[start:start + rows],
                          use_reentrant=False)
        total = part if total is None else total + part
    return total


def head_probe(model, head, vocab: int) -> bool:
    """Whether the model's logits are exactly its head applied to what `head_bypassed` returns."""
    import torch

    device = next(model.parameters()).device
    ids = torch.randint(1, vocab, (1, 6), generator=torch.Generator().manual_seed(0)).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
            with head_bypassed(head):
                hidden = model(input_ids=ids, use_cache=False).logits
            if hidden.shape[:-1] != logits.shape[:-1]:
                return False
            again = head(hidden)
    except (TypeError, ValueError, RuntimeError):
        return False
    finally:
        model.train(was_training)
    return again.shape == logits.shape and bool(torch.allclose(again.float(), logits.float(), rtol=1e-4, atol=1e-5))


@contextlib.contextmanager
def adapter_inputs_as_they_come(layers: list, device_type: str):
    """Under autocast, peft's LoRA layers need not cast their input to the fp32 of the LoRA weights:
    with a bf16 base that cast copies every LoRA input to fp32 (the dropout then runs on the copy) and
    autocast casts it back for the product, twice the traffic of the product itself. Outside autocast
    (sampling) the cast is needed and stays."""
    import torch

    if not layers or not torch.is_autocast_enabled(device_type):
        yield
        return
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.cast_input_dtype_enabled = True


class AnswerLoss:
    """(sum of the answer tokens' cross-entropy, their count) of a collated batch, without full logits
    where the model allows it (`chunked`)."""

    def __init__(self, model, device, autocast=contextlib.nullcontext, chunk_elements: int = CHUNK_ELEMENTS):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.device, self.autocast, self.chunk_elements = device, autocast, chunk_elements
        head = model.get_output_embeddings()
        vocab = head.weight.shape[0] if head is not None and hasattr(head, "weight") else 0
        self.head = head if vocab and head_probe(model, head, vocab) else None
        self.adapters = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]

    @property
    def chunked(self) -> bool:
        return self.head is not None

    @property
    def note(self) -> str:
        if self.head is None:
            return ("Loss: from full logits (this model does more to its logits than its output head's product, so "
                    "the head is not applied in chunks)")
        vocab = self.head.weight.shape[0]
        return (f"Loss: answer tokens only, output head and cross-entropy in chunks of {max(1, self.chunk_elements // vocab)} "
                f"tokens (vocabulary {vocab}; no full-vocabulary logits)")

    def __call__(self, model, batch: dict):
        inputs = {k: v.to(self.device) for k, v in batch.items() if k != "labels"}
        labels = batch["labels"]
        with self.autocast(), adapter_inputs_as_they_come(self.adapters, self.device.type):
            if self.head is None:
                return token_loss(model(**inputs, use_cache=False).logits, labels)
            with head_bypassed(self.head):
                hidden = model(**inputs, use_cache=False).logits
            targets = labels[:, 1:].to(hidden.device)
            keep = targets != IGNORE
            count = keep.sum()
            if not int(count):  # nothing to learn here; stay in the graph so every rank's backward matches
                return hidden.sum() * 0, count
            return chunked_cross_entropy(self.head, hidden[:, :-1][keep], targets[keep], self.chunk_elements), count


def evaluate(loss: AnswerLoss, model, samples: list[Sample], batch_size: int, pad_id: int) -> tuple[float, float]:
    """Mean answer-token loss on held-out samples, and its perplexity."""
    import torch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(samples), batch_size):
            s, n = loss(model, collate(samples[i : i + batch_size], pad_id))
            total += s.item()
            count += n.item()
    model.train(was_training)
    mean = total / max(count, 1)
    return mean, math.exp(min(mean, 50.0))
