"""Causal language models as a task of the training loop: frozen LM, PEFT LoRA, answer-only loss.

Output layout under `output_dir` (the SD side's, with folders for files):
- `<output_name>/`: the PEFT adapter (adapter_config.json + adapter_model.safetensors), the tokenizer
  it was trained with and training_info.json. A name already taken gets `_2`, `_3`, ...: an earlier
  run's adapter is never replaced, and the folder appears whole.
- `<output_name>-merged/` (with `merge_output`): the base model with the LoRA merged in.
- `checkpoints/<output_name>-stepNNNNNN/`: the adapter at that step; `checkpoints/state-stepNNNNNN/`:
  the training state `resume` continues from (shared/training/state.py).
- `logs/` (or `log_dir`): TensorBoard scalars and `samples.jsonl` with the sample generations.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from shared.llm.data import build_data, collate
from shared.llm.export import export_merged, run_info, save_adapter
from shared.llm.lora import add_lora, enable_gradient_checkpointing, resolve_targets, trainable_parameters
from shared.llm.loss import evaluate, token_loss
from shared.llm.model import (
    check_causal_lm,
    load_causal_lm,
    load_tokenizer,
    quantization_config,
    read_model_config,
)
from shared.llm.samples import SampleWriter, sample_prompts
from shared.training.task import Evaluation, Finish, Precision, Progress, Samples, Task

# token-length ranges of the `buckets` event: 1-16, 17-32, 33-64, ...
_FIRST_BUCKET = 16


def length_range(n: int) -> str:
    top = _FIRST_BUCKET
    while top < n:
        top *= 2
    return f"{top // 2 + 1 if top > _FIRST_BUCKET else 1}-{top}"


class LLMTask(Task):
    name = "llm"
    adapter_suffix = ""  # a folder

    # --- set-up ----------------------------------------------------------------------------------
    def memory_model(self, precision: Precision):
        from shared.llm.memory import llm_memory_model

        check_causal_lm(Path(self.cfg.base_model), read_model_config(Path(self.cfg.base_model)),
                        self.cfg.trust_remote_code)  # before any code of the folder's runs
        self._tokenize()  # the longest batch is what the estimate needs; load reuses the data
        lengths = sorted((len(s.input_ids) for s in self.data.train), reverse=True)
        return llm_memory_model(self.cfg, precision, lengths)

    def _tokenize(self) -> None:
        """The tokenizer and the tokenized (packed) data, once: no lever changes them."""
        if getattr(self, "data", None) is not None:
            return
        cfg, base = self.cfg, Path(self.cfg.base_model)
        self.tokenizer = tokenizer = load_tokenizer(base, cfg.trust_remote_code)
        self.data = build_data(
            cfg.train_data_dir, tokenizer, max_seq_len=cfg.max_seq_len, train_on_prompt=cfg.train_on_prompt,
            chat_template=cfg.chat_template, packing=cfg.packing, val_split=cfg.val_split, seed=cfg.seed,
            model_name=str(base),
        )

    def load(self, precision: Precision) -> None:
        cfg, reporter = self.cfg, self.reporter
        base = Path(cfg.base_model)
        self.device, self.autocast = precision.device, precision.autocast
        # Everything that can refuse the job runs before the weights load.
        model_json = read_model_config(base)
        check_causal_lm(base, model_json, cfg.trust_remote_code)
        quantization_config(cfg.load_in_4bit)
        self._tokenize()
        tokenizer, data = self.tokenizer, self.data
        for line in data.report:
            reporter.log(line)
        model = load_causal_lm(base, trust_remote_code=cfg.trust_remote_code, dtype=precision.weight_dtype,
                               load_in_4bit=cfg.load_in_4bit)
        use_cache = bool(getattr(model.config, "use_cache", True))
        n_params = sum(p.numel() for p in model.parameters())
        reporter.log(f"Loaded base model from {base} ({model_json.get('model_type')}, {n_params / 1e6:.1f}M parameters)")
        targets = resolve_targets(model, cfg.target_modules)
        if cfg.load_in_4bit:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        elif cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.model = model = add_lora(model, cfg, targets)
        if not cfg.load_in_4bit:
            model.to(self.device)
        model.train()
        self.params = trainable_parameters(model)
        leaves = sorted({t.rsplit(".", 1)[-1] for t in targets})
        reporter.log(
            f"Injected LoRA adapters with rank={cfg.lora_rank} (alpha={cfg.lora_alpha}, {len(targets)} modules: "
            f"{', '.join(leaves)}; {sum(p.numel() for p in self.params):,} trainable parameters"
            + (", rsLoRA" if cfg.use_rslora else "") + (", DoRA" if cfg.use_dora else "") + ")"
        )
        self.pad_id = tokenizer.pad_token_id
        self.samples = SampleWriter(sample_prompts(cfg, data, tokenizer), tokenizer, cfg.sample_max_tokens,
                                    use_cache, reporter)
        if data.renderer.template is not None and data.uses_template:
            tokenizer.chat_template = data.renderer.template  # the adapter's tokenizer carries what was trained
        self.eval_losses: list[float] = []
        self.info: dict | None = None

    def histogram(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in sorted(self.data.train, key=lambda s: len(s.input_ids)):
            key = length_range(len(s.input_ids))
            counts[key] = counts.get(key, 0) + 1
        return counts

    def param_groups(self) -> list[dict]:
        return [{"params": self.params, "lr": self.cfg.learning_rate}]

    def train_modules(self) -> list:
        return [self.model]

    def trainable(self) -> dict:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def fingerprint(self) -> dict:
        return {"sequences": len(self.data.train)}

    # --- a step ----------------------------------------------------------------------------------
    def epoch_batches(self, epoch: int, size: int) -> list[list]:
        """A seeded order per epoch (its own generator: the global RNG, which the dropout masks use,
        draws nothing here), cut into batches of `size`."""
        import torch

        order = torch.randperm(len(self.data.train),
                               generator=torch.Generator().manual_seed(self.cfg.seed * 1000003 + epoch)).tolist()
        train = self.data.train
        return [[train[i] for i in order[j : j + size]] for j in range(0, len(order), size)]

    def loss(self, items: list, modules: list):
        batch = collate(items, self.pad_id)
        with self.autocast():
            logits = modules[0](input_ids=batch["input_ids"].to(self.device),
                                attention_mask=batch["attention_mask"].to(self.device)).logits
        return token_loss(logits, batch["labels"])

    # --- looking at it ---------------------------------------------------------------------------
    def evaluate(self, step: int, log_dir: Path) -> Evaluation:
        """Eval loss and perplexity on the held-out samples (none without a validation split), and the
        sample answers."""
        metrics = {}
        if self.data.val:
            loss, ppl = evaluate(self.model, self.data.val, self.cfg.batch_size, self.pad_id, self.device)
            self.reporter.log(f"Eval at step {step}: loss {loss:.4f}, perplexity {ppl:.2f} "
                              f"({len(self.data.val)} held-out samples)")
            self.eval_losses.append(loss)
            metrics = {"eval_loss": loss, "perplexity": ppl}
        return Evaluation(metrics=metrics, samples=self.samples.run(self.model, step, log_dir))

    def sample(self, step: int, log_dir: Path) -> Samples | None:
        return self.samples.run(self.model, step, log_dir)

    # --- output ----------------------------------------------------------------------------------
    def write_adapter(self, path: Path, name: str, progress: Progress, final: bool) -> None:
        save_adapter(self.model, self.tokenizer, path, self.info if final else None)

    def finish(self, output_dir: Path, progress: Progress) -> Finish:
        started = datetime.fromtimestamp(progress.started_at, timezone.utc).isoformat(timespec="seconds")
        self.info = run_info(self.cfg, started, progress.step, self.data, progress.losses, self.eval_losses)
        return Finish()

    def exports(self, published: Path, output_dir: Path) -> dict[str, Path]:
        if not self.cfg.merge_output:
            return {}
        merged = export_merged(self.model, self.tokenizer, Path(self.cfg.base_model), output_dir,
                               f"{published.name}-merged")
        self.reporter.log(f"Saved merged model to {merged}")
        return {"merged": merged}
