"""What the processes of a data-parallel run agree on inside the loop (one process: no-ops).

Every rank plans the same global batches and trains its own slice (`shard`); the loss of a slice is
divided by the count over all ranks (`global_count`), so the averaged gradients are those of the
whole batch. Stop decisions and the state to resume come from rank 0; each rank's RNG is saved.
"""

from __future__ import annotations

import os

from shared.training.state import rng_state

ABORT_EXIT = 76  # every rank's exit code when the launcher went away


def shard(items: list, rank: int, processes: int, size: int) -> tuple[list, float]:
    """This rank's part of a global batch, and the factor on its mean loss that makes the ranks'
    averaged gradients equal the whole batch's mean. A bucket's last batch may leave a rank with
    nothing: it trains the batch's first item with weight 0, so every rank still joins each
    gradient exchange."""
    mine = items[rank * size : (rank + 1) * size]
    if not mine:
        return items[:1], 0.0
    return mine, len(mine) * processes / len(items)


def global_count(accelerator, count):
    """The loss normaliser of all ranks together (samples, tokens), at least 1."""
    import torch

    count = torch.as_tensor(count, dtype=torch.float32, device=accelerator.device)
    if accelerator.num_processes > 1:
        count = accelerator.reduce(count, reduction="sum")
    return count.clamp(min=1)


def average_gradients(accelerator, params) -> None:
    """Average over the ranks the gradients that no data-parallel wrapper synced (parameters of
    modules the task calls directly, e.g. SD's text encoders)."""
    if accelerator.num_processes == 1:
        return
    for p in params:
        if p.grad is not None:
            p.grad = accelerator.reduce(p.grad, reduction="mean")


def stop_all(accelerator, reporter) -> bool:
    """Rank 0 decides whether to stop, every rank hears the same answer (they stop at the same step).
    One process: just ask the reporter."""
    if accelerator.num_processes == 1:
        return reporter.stop_requested()
    import torch
    from accelerate.utils import broadcast

    code = 0
    if accelerator.is_main_process:
        gone = getattr(reporter, "launcher_gone", None)
        code = 2 if gone is not None and gone() else int(reporter.stop_requested())
    flag = broadcast(torch.tensor([code], device=accelerator.device), from_process=0)
    if int(flag.item()) == 2:
        os._exit(ABORT_EXIT)
    return int(flag.item()) == 1


def mean_over_ranks(accelerator, value: float) -> float:
    """A number each rank computed, averaged over the ranks (the logged loss)."""
    if accelerator.num_processes == 1:
        return value
    import torch

    return float(accelerator.reduce(torch.tensor([value], device=accelerator.device), reduction="mean").item())


def from_main(accelerator, value):
    """Rank 0's `value` on every rank (e.g. the state to resume: only machine 0 has the files)."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def gather_rng(accelerator) -> list[dict]:
    """Every rank's RNG state, in rank order (on every rank)."""
    mine = rng_state()
    if accelerator.num_processes == 1:
        return [mine]
    from accelerate.utils import gather_object

    return gather_object([mine])


def batch_note(cfg, processes: int) -> str:
    """The log's batch size line: per process, accumulation, processes, and what one step sees."""
    effective = cfg.batch_size * cfg.gradient_accumulation_steps * processes
    return (f"batch {cfg.batch_size} x {cfg.gradient_accumulation_steps} accumulation x {processes} "
            f"process{'es' if processes > 1 else ''} = effective batch {effective}")
