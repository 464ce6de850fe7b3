"""What an LLM LoRA learns from: SFT (one answer per row) or a preference objective on answer pairs.

`objective: sft` is the LLM task's own data and loss (shared/llm/data.py, loss.py). `objective: dpo
| orpo | kto` (shared/schema/preference.py) trains on rows with a `chosen` and a `rejected` answer,
read by shared/llm/preference.py (file:line errors) and scored by shared/llm/preference_loss.py.
The LLM task (shared/llm/task.py) asks `preference_objective` for one; when it gets one, that
supplies the data, the batches, the loss of a batch, the held-out evaluation and the sample
prompts, while the model, the adapter, the loop and every output stay the task's.

- Items: one pair is one item, so `batch_size` counts pairs and a step runs 2 x batch_size
  sequences (3 x for KTO, whose reference point needs each prompt with another pair's answer).
- Loss: the mean over the batch's pairs (KTO: over its answers). The loop gets it as (sum, count),
  so accumulation and several processes average it as they average SFT's tokens (DPO and ORPO run
  on several processes; KTO's batch estimate needs the whole batch, so the schema keeps it to one).
- Reference (DPO, KTO): the base model, which is the policy with its adapter switched off, in eval
  mode and without gradients (`preference_loss.reference_of`): no second copy of the model in
  memory. ORPO needs none.
- Evaluation: on the held-out pairs (`val_split`), `pair_margin` (mean log p(chosen) - log
  p(rejected)) and `pair_accuracy`, at each checkpoint and at the end; it needs no reference, so it
  compares checkpoints and objectives. Per step, the training batches' margin, reward margin and
  accuracy (TensorBoard `train/*`).
- Not used: packing and train_on_prompt (SFT's; a pair's answers are scored, never its prompt).

TRL is not used: its DPO/ORPO/KTO losses live inside its trainers (see preference_loss.py).
"""

from __future__ import annotations

from pathlib import Path

from shared.errors import DatasetError
from shared.llm.preference import ANSWER_KEYS, PreferencePair, build_preference_data, collate_pairs
from shared.llm.preference_loss import pair_stats, preference_loss

SFT = "sft"
STEP_STATS = ("margin", "reward_margin", "accuracy")  # per step, into TensorBoard as train/<name>


def scan_rows(path: Path, objective: str) -> int:
    """The pre-flight's scan of LLM rows: each parsed as `objective` reads it (no tokenizer); the
    number of rows. A chosen/rejected row in an SFT job says which objective reads it."""
    from shared.llm.data import parse_record, read_records
    from shared.llm.preference import parse_preference

    parse = parse_record if objective == SFT else parse_preference
    records = read_records(Path(path))
    for record in records:
        try:
            parse(record)
        except DatasetError as exc:
            if objective == SFT and set(ANSWER_KEYS) <= set(record.data):
                raise DatasetError(f"{exc}; rows with `chosen` and `rejected` answers train with objective: dpo, "
                                   "orpo or kto") from None
            raise
    return len(records)


def preference_objective(cfg, tokenizer, reporter) -> Preference | None:
    """The job's preference objective, its data read and checked; None for SFT."""
    return None if cfg.objective == SFT else Preference(cfg, tokenizer, reporter)


class Preference:
    """DPO, ORPO or KTO as the LLM task's data, batches, loss and evaluation (module docstring)."""

    def __init__(self, cfg, tokenizer, reporter):
        self.cfg, self.method, self.reporter = cfg, cfg.objective, reporter
        self.tokenizer, self.pad_id = tokenizer, tokenizer.pad_token_id
        self.data = data = build_preference_data(
            cfg.train_data_dir, tokenizer, max_seq_len=cfg.max_seq_len, chat_template=cfg.chat_template,
            val_split=cfg.val_split, seed=cfg.seed, model_name=str(cfg.base_model),
        )
        if self.method == "kto" and len(data.train) < 2:
            raise DatasetError(f"train_data_dir: objective kto needs at least 2 training pairs (its reference point "
                               f"pairs each prompt with another pair's answer); {cfg.train_data_dir} leaves "
                               f"{len(data.train)}")
        what = {"dpo": f"DPO, beta {cfg.pref_beta:g}" + (f", label smoothing {cfg.dpo_label_smoothing:g}"
                                                         if cfg.dpo_label_smoothing else ""),
                "orpo": f"ORPO, lambda {cfg.pref_beta:g}", "kto": f"KTO, beta {cfg.pref_beta:g}"}[self.method]
        reference = "no reference model" if self.method == "orpo" else "reference: the base (the adapter switched off)"
        data.report.append(f"Objective: {what} on {len(data.train)} pairs ({reference}); batch_size counts pairs")
        unused = [k for k, on in (("packing", str(cfg.packing).lower() == "true"), ("train_on_prompt", cfg.train_on_prompt))
                  if on]
        if unused:
            data.report.append(f"{' and '.join(unused)} apply to SFT rows only; preference pairs are not packed and "
                               "only their answers are scored")
        self.sums = dict.fromkeys(STEP_STATS, 0.0)
        self.batches = 0
        self.margins: list[float] = []  # the held-out pair margin at each evaluation

    # --- the task's data ---------------------------------------------------------------------------
    def histogram(self, length_range) -> dict[str, int]:
        """Pairs per token-length range of the prompt with its longer answer."""
        counts: dict[str, int] = {}
        for n in sorted(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in self.data.train):
            counts[length_range(n)] = counts.get(length_range(n), 0) + 1
        return counts

    def epoch_batches(self, epoch: int, size: int) -> list[list[PreferencePair]]:
        """A seeded order per epoch (its own generator, as the task's SFT batches), cut into batches of
        `size` pairs. KTO: a last batch of one pair joins the one before (it needs two)."""
        import torch

        train = self.data.train
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.cfg.seed * 1000003 + epoch))
        batches = [[train[i] for i in order[j : j + size].tolist()] for j in range(0, len(train), size)]
        if self.method == "kto" and len(batches) > 1 and len(batches[-1]) == 1:
            last = batches.pop()
            batches[-1] = batches[-1] + last
        return batches

    # --- a step ------------------------------------------------------------------------------------
    def loss(self, items: list[PreferencePair], module, peft_model, autocast, device):
        """(the batch's loss summed over its pairs, the number of pairs); KTO: over its answers.
        `module` is what the loop prepared (it may be a DDP wrapper); `peft_model` the PeftModel."""
        batch = collate_pairs(items, self.pad_id, mismatched=self.method == "kto")
        batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
        with autocast():
            loss, stats = preference_loss(module, batch, self.method, self.cfg.pref_beta, peft_model=peft_model,
                                          label_smoothing=self.cfg.dpo_label_smoothing)
        for name in STEP_STATS:
            self.sums[name] += getattr(stats, name)
        self.batches += 1
        count = len(items) * (2 if self.method == "kto" else 1)
        return loss * count, count

    def step_scalars(self) -> dict[str, float]:
        """The mean margin, reward margin and accuracy of the micro-batches since the last call."""
        if not self.batches:
            return {}
        out = {name: total / self.batches for name, total in self.sums.items()}
        self.sums, self.batches = dict.fromkeys(STEP_STATS, 0.0), 0
        return out

    # --- looking at it -----------------------------------------------------------------------------
    def evaluate(self, model, step: int, device) -> dict[str, float]:
        """`pair_margin` and `pair_accuracy` on the held-out pairs (none without val_split)."""
        if not self.data.val:
            return {}
        margin, accuracy = pair_stats(model, self.data.val, self.pad_id, self.cfg.batch_size, device)
        self.margins.append(margin)
        self.reporter.log(f"Eval at step {step}: pair margin {margin:+.3f} (mean log p(chosen) - log p(rejected)); "
                          f"{accuracy:.0%} of {len(self.data.val)} held-out pairs prefer the chosen answer")
        return {"pair_margin": margin, "pair_accuracy": accuracy}

    def sample_prompts(self) -> list[tuple[str, list[int]]]:
        """(shown text, token ids) per sample prompt: the config's, else up to 3 prompts of the pairs."""
        renderer, chat = self.data.renderer, self.data.uses_template
        if self.cfg.sample_prompts:
            return [(p, renderer.prompt_ids(p, as_chat=chat)) for p in self.cfg.sample_prompts]
        pairs = (self.data.val + self.data.train)[:3]
        return [(self.tokenizer.decode(p.prompt_ids, skip_special_tokens=True).strip(), p.prompt_ids) for p in pairs]

    def info(self) -> dict:
        """What training_info.json records of the objective."""
        return {"objective": self.method, "pref_beta": self.cfg.pref_beta, "train_pairs": len(self.data.train),
                "val_pairs": len(self.data.val), "pair_margin": self.margins[-1] if self.margins else None,
                "pair_margins": self.margins}
