"""Preference losses: DPO, ORPO and KTO, as functions of log-probabilities.

The reference model of DPO and KTO is the policy itself with its LoRA adapter switched off
(`PeftModel.disable_adapter()`): the frozen base, with no second copy of the model in memory.
ORPO needs no reference.

Written from the papers rather than taken from TRL: in TRL 1.x the DPO loss is inlined in
`DPOTrainer._compute_loss` (it runs the forward passes itself and reads the trainer's state), and
ORPO's `odds_ratio_loss` / KTO's loss are methods of their trainers (under `trl.experimental`),
so none can be called from our own loop; TRL would also bring datasets, pandas and pyarrow.

- DPO (Rafailov et al. 2023, eq. 7): loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))),
  with pi/ref the summed log-probabilities of the chosen (c) and rejected (r) answers; with
  label smoothing eps (conservative DPO) the loss is (1 - eps) * that + eps * (the same for -x).
- ORPO (Hong et al. 2024, eqs. 4-7): log odds(y) = log p - log(1 - p) with p the per-token mean
  probability of the answer (exp of the mean log-probability); loss = NLL(chosen) + lambda *
  -log sigmoid(log odds(chosen) - log odds(rejected)).
- KTO (Ethayarajh et al. 2024, eq. 8): with r = log(pi/ref) of an answer and z a detached, clamped
  (>= 0) batch estimate of KL(pi || ref) from mismatched prompt/answer pairs, a desirable answer
  costs w_d * (1 - sigmoid(beta * (r - z))) and an undesirable one w_u * (1 - sigmoid(beta * (z - r))).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from shared.llm.data import IGNORE

METHODS = ("dpo", "orpo", "kto")


def answer_logps(logits, labels):
    """(sum of log-probabilities of the labelled tokens per row, number of labelled tokens per row)."""
    import torch

    logits = logits[:, :-1].float()
    labels = labels[:, 1:].to(logits.device)
    mask = labels != IGNORE
    picked = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1), mask.sum(-1)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1, label_smoothing: float = 0.0):
    """Per-pair DPO losses, and the implicit rewards beta * log(pi/ref) of chosen and rejected."""
    import torch.nn.functional as F

    logits = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    return losses, beta * (policy_chosen - ref_chosen).detach(), beta * (policy_rejected - ref_rejected).detach()


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, accurate near 0 and far from it."""
    import math

    import torch

    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(chosen_mean_logps, rejected_mean_logps, chosen_nll, lam: float = 0.1):
    """Per-pair ORPO losses (NLL of the chosen answer plus lam times the odds-ratio term), and the log odds ratio."""
    import torch.nn.functional as F

    log_odds = (chosen_mean_logps - rejected_mean_logps) - (_log1mexp(chosen_mean_logps) - _log1mexp(rejected_mean_logps))
    return chosen_nll - lam * F.logsigmoid(log_odds), log_odds.detach()


def kto_kl_estimate(policy_mismatched, ref_mismatched):
    """KTO's reference point z: mean log(pi/ref) over answers paired with other rows' prompts, >= 0, no gradient."""
    return (policy_mismatched - ref_mismatched).mean().clamp(min=0).detach()


def kto_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, kl, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """Per-answer KTO losses: chosen answers (desirable) then rejected ones (undesirable)."""
    import torch

    chosen = desirable_weight * (1 - torch.sigmoid(beta * ((policy_chosen - ref_chosen) - kl)))
    rejected = undesirable_weight * (1 - torch.sigmoid(beta * (kl - (policy_rejected - ref_rejected))))
    return torch.cat([chosen, rejected])


def pair_stats(model, pairs, pad_id: int, batch_size: int = 8, device=None) -> tuple[float, float]:
    """(mean log p(chosen) - log p(rejected), fraction of pairs with log p(chosen) > log p(rejected))
    of `pairs` (PreferencePair) under `model`: the held-out measure of what preference training
    taught. Needs no reference model, so it compares across objectives and checkpoints."""
    import torch

    from shared.llm.preference import collate_pairs

    was_training = model.training
    model.eval()
    total, right = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            batch = collate_pairs(pairs[i : i + batch_size], pad_id)
            inputs = {k: batch[k].to(device) if device is not None else batch[k] for k in ("input_ids", "attention_mask")}
            logps, _ = answer_logps(model(**inputs).logits, batch["labels"])
            n = batch["n_pairs"]
            margins = logps[:n] - logps[n:]
            total += margins.sum().item()
            right += int((margins > 0).sum().item())
    model.train(was_training)
    return total / max(len(pairs), 1), right / max(len(pairs), 1)


def pair_margin(model, pairs, pad_id: int, batch_size: int = 8) -> float:
    """Mean log p(chosen) - log p(rejected) of `pairs` under `model` (see `pair_stats`)."""
    return pair_stats(model, pairs, pad_id, batch_size)[0]


@contextlib.contextmanager
def reference_of(peft_model):
    """The reference model: `peft_model` with its adapter off, no gradients, and in eval mode (the
    base's own dropout off: the reference is the same function at every step, as a frozen copy is)."""
    import torch

    was_training = peft_model.training
    peft_model.eval()
    try:
        with torch.no_grad(), peft_model.disable_adapter():
            yield
    finally:
        peft_model.train(was_training)


@dataclass
class PreferenceStats:
    loss: float
    margin: float  # mean log p(chosen) - log p(rejected) under the policy
    reward_margin: float  # mean (chosen - rejected) implicit reward (DPO/KTO), log odds ratio (ORPO)
    accuracy: float  # fraction of pairs where the chosen answer is preferred


def preference_loss(model, batch: dict, method: str = "dpo", beta: float = 0.1, *, peft_model=None,
                    label_smoothing: float = 0.0):
    """The loss of one batch from `collate_pairs` (B chosen rows, B rejected rows, and for KTO B
    mismatched rows) and its stats. `model` is what the loop runs forward (it may be an
    accelerate/DDP wrapper); `peft_model` is the unwrapped PeftModel whose adapter is switched off
    for the reference (default: `model`). The reference runs through `peft_model` itself: without
    gradients it needs none of the wrapper's gradient bookkeeping."""
    import torch

    if method not in METHODS:
        raise ValueError(f"preference method {method!r}; use one of {', '.join(METHODS)}")
    b = int(batch["n_pairs"])
    if method == "kto" and batch["input_ids"].shape[0] != 3 * b:
        raise ValueError("kto needs the mismatched rows: collate_pairs(..., mismatched=True)")
    peft_model = model if peft_model is None else peft_model
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    logps, counts = answer_logps(model(**inputs).logits, batch["labels"])
    pc, pr = logps[:b], logps[b : 2 * b]
    if method == "orpo":
        mean = logps / counts.clamp(min=1)
        losses, log_odds = orpo_loss(mean[:b], mean[b : 2 * b], -mean[:b], beta)
        reward_margin = log_odds
    else:
        with reference_of(peft_model):
            ref, _ = answer_logps(peft_model(**inputs).logits, batch["labels"])
        rc, rr = ref[:b], ref[b : 2 * b]
        if method == "dpo":
            losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta, label_smoothing)
        else:
            kl = kto_kl_estimate(logps[2 * b :], ref[2 * b :])
            losses = kto_loss(pc, pr, rc, rr, kl, beta)
            chosen_r, rejected_r = beta * (pc - rc).detach(), beta * (pr - rr).detach()
        reward_margin = chosen_r - rejected_r
    loss = losses.mean()
    with torch.no_grad():
        stats = PreferenceStats(loss.item(), (pc - pr).mean().item(), reward_margin.mean().item(),
                                (reward_margin > 0).float().mean().item())
    return loss, stats
