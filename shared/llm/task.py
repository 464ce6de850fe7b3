"""Causal language models as a task of the training loop: frozen LM, PEFT LoRA, answer-only loss.

Output layout under `output_dir` (the SD side's, with folders for files):
- `<output_name>/`: the PEFT adapter (adapter_config.json + adapter_model.safetensors), the tokenizer
  it was trained with and training_info.json, and the llama.cpp/Ollama files the deploy keys ask for
  (shared/llm/deploy.py). A name already taken gets `_2`, `_3`, ...: an earlier run's adapter is
  never replaced, and the folder appears whole.
- `<output_name>-merged/` (with `merge_output`): the base model with the LoRA merged in.
- `checkpoints/<output_name>-stepNNNNNN/`: the adapter at that step; `checkpoints/state-stepNNNNNN/`:
  the training state `resume` continues from (shared/training/state.py).
- `logs/` (or `log_dir`): TensorBoard scalars and `samples.jsonl` with the sample generations.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from shared.llm import attention, packing
from shared.llm.batching import grouped_batches
from shared.llm.data import IGNORE, build_data, collate
from shared.llm.deploy import Targets
from shared.llm.export import export_merged, run_info, save_adapter
from shared.llm.generate import greedy
from shared.llm.lora import add_lora, enable_gradient_checkpointing, resolve_targets, trainable_parameters
from shared.llm.loss import AnswerLoss, evaluate
from shared.llm.model import (
    check_causal_lm,
    load_causal_lm,
    load_tokenizer,
    quantization_config,
    read_model_config,
)
from shared.llm.objective import preference_objective
from shared.llm.samples import SampleWriter, prompt_ids, sample_prompts
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
    # glibc's own allocator: the fixed mmap threshold faulted every step's activations in afresh (the
    # 53 M LLaMA benchmark: 16 M page faults, 1.8x the step time) for a 15% lower peak; the estimate
    # counts what the heap keeps instead (shared/llm/memory.py HEAP)
    lean_allocator = False
    # rows of varied length make a new batch width nearly every step, and with it new matmul kernels
    # (a bf16 one holds 1.2-1.5 MiB with its scratch, on AVX512-BF16 and AMX alike): capped at 64, the
    # 53 M benchmark's default job peaks 9% lower than at 128 (2031 against 2227 MiB on an AMX CPU) at
    # the same step time; 128 was 10% lower than the 1024 default on the AMD CPU. Not lower: a
    # layer's backward alone makes some 30 of them, and an LRU cache smaller than what one layer
    # cycles through would miss on every call
    kernel_cache = 64

    # --- set-up ----------------------------------------------------------------------------------
    def memory_model(self, precision: Precision):
        from shared.llm.memory import llm_memory_model

        check_causal_lm(Path(self.cfg.base_model), read_model_config(Path(self.cfg.base_model)),
                        self.cfg.trust_remote_code)  # before any code of the folder's runs
        quantization_config(self.cfg.load_in_4bit)  # what the device cannot do is refused before the data is read
        self._tokenize()  # the longest batch is what the estimate needs; load reuses the data
        if self.objective:  # a pair runs as two rows (chosen, rejected) of its prompt and longer answer
            rows = [len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in self.data.train] * 2
        else:
            rows = [len(s.input_ids) for s in self.data.train]
        lengths = sorted(rows, reverse=True)
        return llm_memory_model(self.cfg, precision, lengths)

    def _tokenize(self) -> None:
        """The tokenizer and the tokenized (packed) data, once: no lever changes them."""
        if getattr(self, "data", None) is not None:
            return
        cfg, base = self.cfg, Path(self.cfg.base_model)
        self.tokenizer = tokenizer = load_tokenizer(base, cfg.trust_remote_code)
        self.objective = preference_objective(cfg, tokenizer, self.reporter)  # None: SFT (shared/llm/objective.py)
        self.data = self.objective.data if self.objective else build_data(
            cfg.train_data_dir, tokenizer, max_seq_len=cfg.max_seq_len, train_on_prompt=cfg.train_on_prompt,
            chat_template=cfg.chat_template, val_split=cfg.val_split, seed=cfg.seed, model_name=str(base),
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
        self.targets = Targets(cfg, tokenizer, data.renderer.template if data.uses_template else None, reporter)
        chosen, note = attention.resolve(cfg.attention, self.device, precision.mixed_precision)
        reporter.log(note)
        model = load_causal_lm(base, trust_remote_code=cfg.trust_remote_code, dtype=precision.weight_dtype,
                               load_in_4bit=cfg.load_in_4bit,
                               attn_implementation=attention.implementation(chosen, self.device, precision.weight_dtype))
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
        if chosen == "auto":  # eager or sdpa, batch by batch (shared/llm/attention.py)
            attention.dispatch_by_width(model)
        self.model = model = add_lora(model, cfg, targets)
        if not cfg.load_in_4bit:
            model.to(self.device)
        model.train()
        # packs data.train when on; preference pairs are scored whole (shared/llm/objective.py)
        self.packing = (packing.PackingChoice(False, "Packing: off (preference pairs)") if self.objective
                        else packing.arrange(data, cfg.packing, cfg.max_seq_len, model))
        self.lm_loss = AnswerLoss(model, self.device, self.autocast)
        for line in data.report + [self.packing.reason, self.lm_loss.note]:
            reporter.log(line)
        self.params = trainable_parameters(model)
        leaves = sorted({t.rsplit(".", 1)[-1] for t in targets})
        reporter.log(
            f"Injected LoRA adapters with rank={cfg.lora_rank} (alpha={cfg.lora_alpha}, {len(targets)} modules: "
            f"{', '.join(leaves)}; {sum(p.numel() for p in self.params):,} trainable parameters"
            + (", rsLoRA" if cfg.use_rslora else "") + (", DoRA" if cfg.use_dora else "") + ")"
        )
        self.pad_id = tokenizer.pad_token_id
        prompts = self.objective.sample_prompts() if self.objective else sample_prompts(cfg, data, tokenizer)
        self.samples = SampleWriter(prompts, tokenizer, cfg.sample_max_tokens, use_cache, reporter)
        if data.renderer.template is not None and data.uses_template:
            tokenizer.chat_template = data.renderer.template  # the adapter's tokenizer carries what was trained
        self.eval_losses: list[float] = []
        self._eval_ids: dict[str, list[int]] | None = None  # evaluation prompt -> token ids (eval_prompts)
        self.info: dict | None = None

    def histogram(self) -> dict[str, int]:
        if self.objective:
            return self.objective.histogram(length_range)
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
        # a preference state is not continued with another objective (SFT states keep their old fingerprint)
        return {"sequences": len(self.data.train), "packing": self.packing.on,
                **({"objective": self.cfg.objective} if self.objective else {})}

    # --- a step ----------------------------------------------------------------------------------
    def epoch_batches(self, epoch: int, size: int) -> list[list]:
        """Batches of `size` sequences of similar length, in a seeded order per epoch
        (shared/llm/batching.py); preference pairs as their objective orders them."""
        if self.objective:
            return self.objective.epoch_batches(epoch, size)
        train = self.data.train
        lengths = [len(s.input_ids) for s in train]
        return [[train[i] for i in batch] for batch in grouped_batches(lengths, size, self.cfg.seed, epoch)]

    def loss(self, items: list, modules: list):
        if self.objective:
            return self.objective.loss(items, modules[0], self.model, self.autocast, self.device)
        if self.packing.on and self.packing.isolated:
            batch = packing.collate_packed(items, self.pad_id, flat=self.packing.flat)
        else:
            batch = collate(items, self.pad_id)
        return self.lm_loss(modules[0], batch)

    # --- looking at it ---------------------------------------------------------------------------
    def evaluate(self, step: int, log_dir: Path) -> Evaluation:
        """Eval loss and perplexity on the held-out samples (none without a validation split), and the
        sample answers."""
        if self.objective:  # the held-out pair margin (shared/llm/objective.py)
            return Evaluation(self.objective.evaluate(self.model, step, self.device),
                              self.samples.run(self.model, step, log_dir))
        metrics = {}
        if self.data.val:
            loss, ppl = evaluate(self.lm_loss, self.model, self.data.val, self.cfg.batch_size, self.pad_id)
            self.reporter.log(f"Eval at step {step}: loss {loss:.4f}, perplexity {ppl:.2f} "
                              f"({len(self.data.val)} held-out samples)")
            self.eval_losses.append(loss)
            metrics = {"eval_loss": loss, "perplexity": ppl}
        return Evaluation(metrics=metrics, samples=self.samples.run(self.model, step, log_dir))

    def sample(self, step: int, log_dir: Path) -> Samples | None:
        return self.samples.run(self.model, step, log_dir)

    def step_scalars(self) -> dict[str, float]:
        return self.objective.step_scalars() if self.objective else {}

    def eval_prompts(self) -> list[str]:
        if self._eval_ids is None:
            given = super().eval_prompts()
            if self.objective and not given:  # the pairs' prompts (shared/llm/objective.py)
                self._eval_ids = dict(self.objective.sample_prompts()[: self.cfg.eval_prompt_count])
            else:
                self._eval_ids = dict(prompt_ids(given, self.data, self.tokenizer, self.cfg.eval_prompt_count))
        return list(self._eval_ids)

    def answer(self, prompts: list[str], weight: float) -> list:
        """Greedy answers (up to eval_max_tokens) with the adapter on (weight 1) or off (0: the base)."""
        import contextlib

        if weight not in (0, 1):
            raise ValueError(f"an LLM adapter is evaluated off (0) or on (1), not at weight {weight}")
        known = self._eval_ids or {}
        renderer, as_chat = self.data.renderer, self.data.uses_template
        was_training = self.model.training
        self.model.eval()
        try:
            with self.model.disable_adapter() if weight == 0 else contextlib.nullcontext():
                return [greedy(self.model, self.tokenizer, known.get(p) or renderer.prompt_ids(p, as_chat=as_chat),
                               self.eval_max_tokens(), use_cache=self.samples.use_cache) for p in prompts]
        finally:
            self.model.train(was_training)

    def eval_max_tokens(self) -> int:
        """The evaluation answers' token limit: `eval_max_tokens`, else twice the longest trained answer (a
        model that learned to stop stops well within it), at least 32 and at most 1024."""
        if self.cfg.eval_max_tokens:
            return self.cfg.eval_max_tokens
        if self.objective:  # preference pairs: the longest chosen answer
            longest = max((len(p.chosen_ids) for p in self.data.train), default=0)
        else:
            longest = max((sum(label != IGNORE for label in s.labels) for s in self.data.unpacked_train + self.data.val),
                          default=0)
        return min(1024, max(32, 2 * longest))

    def data_summary(self) -> dict:
        data = self.data
        return {"train_sequences": len(data.train), "val_samples": len(data.val),
                **({"objective": self.cfg.objective} if self.objective else {}),
                "chat_template": bool(data.uses_template)}

    # --- output ----------------------------------------------------------------------------------
    def write_adapter(self, path: Path, name: str, progress: Progress, final: bool) -> None:
        save_adapter(self.model, self.tokenizer, path, self.info if final else None)
        if final:
            self.targets.write(path, name)  # the llama.cpp/Ollama files appear with the adapter

    def finish(self, output_dir: Path, progress: Progress) -> Finish:
        started = datetime.fromtimestamp(progress.started_at, timezone.utc).isoformat(timespec="seconds")
        self.info = run_info(self.cfg, started, progress.step, self.data, progress.losses, self.eval_losses)
        if self.objective:
            self.info.update(self.objective.info())
        return Finish()

    def exports(self, published: Path, output_dir: Path) -> dict[str, Path]:
        merged = None
        if self.cfg.merge_output:
            merged = export_merged(published, self.tokenizer, Path(self.cfg.base_model), output_dir,
                                   f"{published.name}-merged", trust_remote_code=self.cfg.trust_remote_code)
            self.reporter.log(f"Saved merged model to {merged}")
        return {**({"merged": merged} if merged else {}), **self.targets.after_publish(published, output_dir, merged)}
