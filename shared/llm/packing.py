"""Packing: whole rows joined into sequences of up to `max_seq_len` tokens, each row attending to itself
only, and the `packing: auto` rule that decides when it pays.

How a packed sequence keeps its rows apart: its position ids restart at 0 for every row and no 2D
attention mask is passed. Transformers 5 reads that layout itself (`masking_utils.
find_packed_sequence_indices`): for sdpa and eager attention it builds a block-diagonal causal mask,
and for flash-attention it takes the varlen path (`cu_seqlens` from the position ids; that path wants
the whole micro-batch as one row, which `collate_packed(..., flat=True)` gives). That is the layout of
its `DataCollatorWithFlattening`; we build it from our samples (labels, EOS and all) rather than
through that collator, which flattens every batch into one row, but on the CPU a row of B x L tokens
costs (B x L)^2 attention where B rows of L cost B x L^2. Padding between the packed sequences of a
batch is a run of its own (positions 0, 1, ...), so it too attends only to itself, and carries no
label.

The first label of every row is dropped (-100): it would be predicted by the last token of the row
before it, which alone never happens; with that, a row's loss in a packed sequence is its loss alone.

Not every model reads packed position ids (remote-code models build their own masks): `probe` checks
the loaded model once on a few tokens, and packing without it falls back as the log says.
"""

from __future__ import annotations

import bisect
import statistics
from dataclasses import dataclass, field

from shared.llm.data import IGNORE, Sample

# `packing: auto` packs when the median row is at most this share of max_seq_len: a packed sequence
# then holds four rows or more on average, and a batch of unpacked rows (grouped by length) would
# be mostly short matrix products and per-step overhead. Above it, length-grouped batches leave
# little padding and keep one row per sequence (the optimizer steps stay per row).
AUTO_SHARE = 0.25


@dataclass
class PackedSample(Sample):
    """Whole rows joined in one sequence; `lengths` are the rows' token counts, in order."""

    lengths: list[int] = field(default_factory=list)


@dataclass
class PackingChoice:
    on: bool
    reason: str
    isolated: bool = True  # rows attend only to themselves (position ids); False: plain concatenation
    flat: bool = False  # a micro-batch as one row (flash-attention's varlen path)


def decide(setting, samples: list[Sample], max_seq_len: int) -> PackingChoice:
    """Whether to pack, and why, for the `packing` setting (`auto`, true or false)."""
    lengths = [len(s.input_ids) for s in samples]
    median = statistics.median(lengths) if lengths else 0
    share = median / max_seq_len
    stats = f"median row {median:g} tokens, {share:.0%} of max_seq_len={max_seq_len}"
    if setting != "auto":
        return PackingChoice(bool(setting), f"packing: {str(bool(setting)).lower()} ({stats})")
    if share <= AUTO_SHARE:
        return PackingChoice(True, f"packing: auto -> on ({stats}, at most {AUTO_SHARE:.0%}: "
                                   "rows are joined into sequences, each attending to itself)")
    return PackingChoice(False, f"packing: auto -> off ({stats}, over {AUTO_SHARE:.0%}: too few rows would share "
                                "a sequence; batches are grouped by length instead)")


def pack(samples: list[Sample], max_len: int) -> list[PackedSample]:
    """Join whole samples into sequences of at most `max_len` tokens, best-fit decreasing (each row,
    longest first, goes into the fullest sequence it still fits): sequences come out nearly full.
    Deterministic: ties keep the data's order. Samples are never split; each keeps its labels and
    EOS, less its first label (see the module docstring)."""
    order = sorted(range(len(samples)), key=lambda i: -len(samples[i].input_ids))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in order:
        n = len(samples[i].input_ids)
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, b = free.pop(at)
            bins[b].append(i)
            bisect.insort(free, (room - n, b))
        else:
            bins.append([i])
            bisect.insort(free, (max_len - n, len(bins) - 1))
    out = []
    for members in bins:
        rows = [samples[i] for i in sorted(members)]  # data order inside a sequence
        ids, labels = [], []
        for s in rows:
            ids += s.input_ids
            labels += [IGNORE] + s.labels[1:]
        out.append(PackedSample(ids, labels, "", "; ".join(s.where for s in rows),
                                lengths=[len(s.input_ids) for s in rows]))
    return out


def position_ids(lengths: list[int], width: int) -> list[int]:
    """Positions restarting at 0 for every row, then for the padding up to `width`."""
    out = [p for n in lengths for p in range(n)]
    return out + list(range(width - len(out)))


def collate_packed(samples: list[PackedSample], pad_id: int, *, flat: bool = False) -> dict:
    """A batch of packed sequences: `input_ids`, `labels`, `position_ids` (no attention mask: the
    position ids say where rows start). `flat`: the whole batch as one row (flash-attention's varlen
    path); else one sequence a row, padded to the longest."""
    import torch

    if flat:
        joined = PackedSample([t for s in samples for t in s.input_ids], [t for s in samples for t in s.labels], "",
                              "", lengths=[n for s in samples for n in s.lengths])
        samples = [joined]
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE, dtype=torch.long)
    positions = torch.empty((len(samples), width), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        ids[row, :n] = torch.tensor(s.input_ids)
        labels[row, :n] = torch.tensor(s.labels)
        positions[row] = torch.tensor(position_ids(s.lengths, width))
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def attention_for(device, dtype) -> str | None:
    """flash-attention 2 on a CUDA device computing in bf16/fp16 when the `flash_attn` package is there
    (packed rows then take its varlen path: no padding, no mask, attention per row only); else None,
    transformers' default (sdpa)."""
    import importlib.util

    import torch

    if getattr(device, "type", str(device)) != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    return "flash_attention_2" if importlib.util.find_spec("flash_attn") is not None else None


def uses_varlen(model) -> bool:
    """Whether the model runs flash-attention, whose varlen path wants the batch as one row."""
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", "") or ""
    return implementation.startswith("flash_attention") or implementation.startswith("kernels-community/flash")


def probe(model, vocab: int) -> bool:
    """Whether the loaded model keeps packed rows apart given restarting position ids: the logits of a
    row packed behind another must equal its logits alone (checked once, on 12 tokens)."""
    import torch

    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    first, second = (torch.randint(1, vocab, (1, n), generator=g).to(device) for n in (5, 7))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = model(input_ids=second, use_cache=False).logits.float()
            joined = torch.cat([first, second], dim=1)
            positions = torch.tensor([list(range(5)) + list(range(7))], device=device)
            packed = model(input_ids=joined, position_ids=positions, use_cache=False).logits[:, 5:].float()
    except (TypeError, ValueError, RuntimeError):  # a model whose forward takes no position ids
        return False
    finally:
        model.train(was_training)
    scale = alone.abs().max().clamp(min=1.0)
    return bool(((packed - alone).abs().max() / scale) < 1e-3)


def arrange(data, setting, max_seq_len: int, model) -> PackingChoice:
    """Decide packing for the loaded model and, when on, pack `data.train` in place."""
    choice = decide(setting, data.train, max_seq_len)
    if not choice.on:
        return choice
    vocab = model.get_input_embeddings().weight.shape[0]
    if not probe(model, vocab):
        if setting == "auto":
            return PackingChoice(False, choice.reason.replace("-> on", "-> off", 1).split(" (")[0]
                                 + f" ({type(model).__name__} does not keep packed rows apart by their position "
                                   "ids, so rows would attend to the rows before them; batches are grouped by "
                                   "length instead)")
        choice.isolated = False
        choice.reason += (f"; {type(model).__name__} does not keep packed rows apart by their position ids: a row "
                          "attends to the rows before it in its sequence")
    choice.flat = choice.isolated and uses_varlen(model)
    data.train = pack(data.train, max_seq_len)
    data.report.append(f"Packed {len(data.unpacked_train)} samples into {len(data.train)} sequences of up to "
                       f"{max_seq_len} tokens" + (" (one row per micro-batch: flash-attention varlen)" if choice.flat else ""))
    return choice
