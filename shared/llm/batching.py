"""The micro-batches of an LLM epoch: rows of similar length together, so padding stays small.

An epoch's batches are a pure function of (seed, epoch, batch size, the rows): the loop's resume
contract (`epoch_batches` + the index of the next batch) then continues a stopped run exactly. The
rows are shuffled with a generator of their own (the global RNG, which draws the dropout masks, draws
nothing here), cut into mega-batches of `MEGABATCH` batches, each sorted by length and cut into
batches; the batches are then shuffled, and the one with the most tokens goes first, so a run that
does not fit in memory fails at its first step rather than hours in. This is the grouping the Hugging
Face Trainer does for `group_by_length` (its `LengthGroupedSampler`), in our own order of draws.
"""

from __future__ import annotations

# Mega-batch size in batches (the Trainer's default): large enough that neighbours in length meet,
# small enough that an epoch still mixes short and long rows across its steps.
MEGABATCH = 50


def _generator(seed: int, epoch: int, salt: int = 0):
    import torch

    return torch.Generator().manual_seed(seed * 1000003 + epoch + salt * 7919)


def shuffled(n: int, seed: int, epoch: int) -> list[int]:
    """A seeded order of `n` items for `epoch`."""
    import torch

    return torch.randperm(n, generator=_generator(seed, epoch)).tolist()


def grouped_batches(lengths: list[int], size: int, seed: int, epoch: int) -> list[list[int]]:
    """Indices of the rows in each batch of `epoch`, rows of similar length together."""
    import torch

    order = shuffled(len(lengths), seed, epoch)
    span = size * MEGABATCH
    arranged: list[int] = []
    for start in range(0, len(order), span):
        arranged += sorted(order[start:start + span], key=lambda i: -lengths[i])  # stable: ties stay shuffled
    batches = [arranged[j:j + size] for j in range(0, len(arranged), size)]
    permutation = torch.randperm(len(batches), generator=_generator(seed, epoch, salt=1)).tolist()
    batches = [batches[k] for k in permutation]
    biggest = max(range(len(batches)), key=lambda k: len(batches[k]) * max(lengths[i] for i in batches[k]))
    batches.insert(0, batches.pop(biggest))
    return batches


def padded_tokens(lengths: list[int], batches: list[list[int]]) -> int:
    """Tokens a padded batch layout computes (each batch padded to its longest row)."""
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)
