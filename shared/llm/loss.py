"""The LLM training loss (next-token cross-entropy on the labelled tokens) and the held-out evaluation."""

from __future__ import annotations

import math

from shared.llm.data import IGNORE, Sample, collate


def token_loss(logits, labels):
    """(sum of next-token cross-entropy over labelled positions, number of those positions)."""
    import torch.nn.functional as F

    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return total, (shift_labels != IGNORE).sum()


def evaluate(model, samples: list[Sample], batch_size: int, pad_id: int, device) -> tuple[float, float]:
    """Mean answer-token loss on held-out samples, and its perplexity."""
    import torch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(samples), batch_size):
            batch = collate(samples[i : i + batch_size], pad_id)
            logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
            s, n = token_loss(logits, batch["labels"])
            total += s.item()
            count += n.item()
    model.train(was_training)
    loss = total / max(count, 1)
    return loss, math.exp(min(loss, 50.0))
