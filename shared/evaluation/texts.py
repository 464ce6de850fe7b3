"""Scores of a text adapter, from its greedy answers to fixed prompts and the base model's.

Each answer is an object with `text`, `token_ids` and `stopped` (it ended with an end-of-turn token
before the token limit), as a task's `answer` hook returns them.

- **changed**: the share of answer tokens that differ from the base's answers to the same prompts
  (1 - difflib's matching ratio over the token ids): 0 when the adapter changed nothing.
- **unstopped**: the share of answers that ran into the token limit without an end-of-turn token:
  the classic sign of an end-of-sequence token masked out of the training labels (a collator that
  treats the pad token, set to EOS, as padding), or a template whose end-of-turn marker differs from
  the one generation stops at.
- **repeats**: the mean share of repeated `NGRAM`-token sequences within an answer: loops such as
  "the cat the cat the cat".
- **identical**: the share of prompts whose (non-empty) answer another prompt got word for word.
"""

from __future__ import annotations

from collections import Counter
from difflib import SequenceMatcher

NGRAM = 4


def repeated_share(token_ids: list[int], n: int = NGRAM) -> float:
    """1 - distinct n-grams / n-grams; 0 for an answer too short to hold two n-grams."""
    grams = [tuple(token_ids[i : i + n]) for i in range(len(token_ids) - n + 1)]
    if len(grams) < 2:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def unstopped_share(answers: list) -> float:
    return sum(not a.stopped for a in answers) / len(answers) if answers else 0.0


def repeats_score(answers: list) -> float:
    return sum(repeated_share(a.token_ids) for a in answers) / len(answers) if answers else 0.0


def identical_share(answers: list) -> float:
    texts = [a.text.strip() for a in answers]
    counts = Counter(t for t in texts if t)
    return sum(counts[t] > 1 for t in texts if t) / len(texts) if texts else 0.0


def changed_share(adapter: list, base: list) -> float:
    """Mean over prompts of 1 - SequenceMatcher ratio of the two answers' token ids."""
    if not adapter:
        return 0.0
    ratios = [SequenceMatcher(None, a.token_ids, b.token_ids, autojunk=False).ratio()
              for a, b in zip(adapter, base, strict=True)]
    return 1.0 - sum(ratios) / len(ratios)


def answer_scores(adapter: list, base: list) -> dict[str, float]:
    """Every text score of the adapter's answers, and the base's own for comparison (`base_*`)."""
    return {
        "changed": changed_share(adapter, base),
        "unstopped": unstopped_share(adapter),
        "repeats": repeats_score(adapter),
        "identical": identical_share(adapter),
        "longest": max((len(a.token_ids) for a in adapter), default=0),  # an unstopped answer's: the limit
        "base_unstopped": unstopped_share(base),
        "base_repeats": repeats_score(base),
        "base_identical": identical_share(base),
    }
