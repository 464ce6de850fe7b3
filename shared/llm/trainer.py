"""The LLM LoRA training loop: frozen causal LM, PEFT LoRA, AdamW + warm-up + cosine, answer-only loss.

Output layout under `output_dir` (the SD side's, with folders for files):
- `<output_name>/`: the PEFT adapter (adapter_config.json + adapter_model.safetensors) and the
  tokenizer it was trained with (its chat template included), so inference renders prompts the
  same way. A name already taken gets `_2`, `_3`, ...: an earlier run's adapter is never replaced,
  and the folder appears whole (written beside it, then renamed).
- `<output_name>-merged/` (with `merge_output`): the base model with the LoRA merged in.
- `checkpoints/step-NNNNNN/`: adapter + `training_state.pt` (optimizer, schedule, step) for `resume`.
- `logs/` (or `log_dir`): TensorBoard scalars and `samples.jsonl` with the sample generations.
"""

from __future__ import annotations

import json
import math
import shutil
from datetime import datetime, timezone
from pathlib import Path

from shared.config import TrainConfig
from shared.distributed import batch_note, mean_over_ranks, stop_all
from shared.errors import ConfigError
from shared.files import publish_new_folder, replace_folder
from shared.llm.data import IGNORE, LLMData, Sample, build_data, collate
from shared.llm.generate import greedy
from shared.llm.lora import add_lora, enable_gradient_checkpointing, resolve_targets, trainable_parameters
from shared.llm.model import (
    check_causal_lm,
    load_causal_lm,
    load_tokenizer,
    quantization_config,
    read_model_config,
    remote_code_files,
)
from shared.reporting import ConsoleReporter, Reporter, Throughput, TrainResult
from shared.sd.trainer import _lr_lambda

STATE_FILE = "training_state.pt"


class EpochShuffle:
    """A seeded order per epoch, so a resumed run sees the same batches as an unbroken one."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        import torch

        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


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


def find_checkpoint(cfg: TrainConfig, output_dir: Path) -> Path | None:
    """The checkpoint folder `resume` names, or None for a fresh start."""
    if not cfg.resume:
        return None
    if cfg.resume == "latest":
        found = sorted((output_dir / "checkpoints").glob("step-*/" + STATE_FILE))
        return found[-1].parent if found else None
    # Only a checkpoint of this output_dir: a path elsewhere would be a read outside the folders
    # the daemon confines a job to (it checks path-typed keys, and `resume` is a name).
    name = cfg.resume
    folder = output_dir / "checkpoints" / name
    if "/" in name or "\\" in name or name in (".", "..") or not (folder / STATE_FILE).is_file():
        raise ConfigError(
            f"resume: {name!r} is not a checkpoint in {output_dir / 'checkpoints'}; "
            "use `latest` or a checkpoint folder name like step-000200"
        )
    return folder


class SampleWriter:
    """Sample generations for fixed prompts: into the log, samples.jsonl and TensorBoard."""

    def __init__(self, prompts: list[tuple[str, list[int]]], path: Path, tokenizer, max_tokens: int, use_cache: bool):
        self.prompts, self.path, self.tokenizer = prompts, path, tokenizer
        self.max_tokens, self.use_cache = max_tokens, use_cache

    def run(self, model, step: int, reporter: Reporter, writer) -> list[dict]:
        if not self.prompts:
            return []
        was_training = model.training
        model.eval()
        rows = []
        for shown, ids in self.prompts:
            gen = greedy(model, self.tokenizer, ids, self.max_tokens, use_cache=self.use_cache)
            note = "" if gen.stopped else f" [no EOS within {self.max_tokens} tokens]"
            reporter.log(f"Sample at step {step}: {shown!r} -> {gen.text!r}{note}")
            rows.append({"step": step, "prompt": shown, "output": gen.text, "stopped": gen.stopped})
        model.train(was_training)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.writelines(json.dumps(row) + "\n" for row in rows)
        if writer is not None:
            text = "\n\n".join(f"**{r['prompt']}**\n\n{r['output']}" for r in rows)
            writer.add_text("samples", text, step)
        reporter.event("sample", step=step, paths=[str(self.path)], texts=[r["output"] for r in rows])
        return rows


def sample_prompts(cfg: TrainConfig, data: LLMData, tokenizer) -> list[tuple[str, list[int]]]:
    """(shown text, token ids) for each sample prompt: the config's, else up to 3 from the data."""
    renderer = data.renderer
    if cfg.sample_prompts:
        return [(p, renderer.prompt_ids(p, as_chat=data.uses_template)) for p in cfg.sample_prompts]
    out = []
    for s in data.val + data.unpacked_train:
        if s.prompt_text and len(out) < 3:
            ids = renderer.rendered_prompt_ids(s.prompt_text, as_chat=data.uses_template)
            out.append((tokenizer.decode(ids, skip_special_tokens=True).strip(), ids))
    return out


def train_llm(cfg: TrainConfig, reporter: Reporter | None = None) -> TrainResult:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from torch.utils.data import DataLoader
    from torch.utils.tensorboard import SummaryWriter

    reporter = reporter or ConsoleReporter()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    base = Path(cfg.base_model)
    output_dir = Path(cfg.output_dir)

    # Everything that can refuse the job runs before anything is written.
    model_json = read_model_config(base)
    check_causal_lm(base, model_json, cfg.trust_remote_code)
    quantization_config(cfg.load_in_4bit)
    tokenizer = load_tokenizer(base, cfg.trust_remote_code)
    data = build_data(
        cfg.train_data_dir,
        tokenizer,
        max_seq_len=cfg.max_seq_len,
        train_on_prompt=cfg.train_on_prompt,
        chat_template=cfg.chat_template,
        packing=cfg.packing,
        val_split=cfg.val_split,
        seed=cfg.seed,
        model_name=str(base),
    )
    for line in data.report:
        reporter.log(line)
    resume_from = find_checkpoint(cfg, output_dir)

    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        cpu=cfg.device == "cpu",
    )
    device = accelerator.device
    reporter.log(f"Using device: {device}")
    set_seed(cfg.seed)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision, torch.float32)
    if device.type == "cpu":
        dtype = torch.float32
    model = load_causal_lm(base, trust_remote_code=cfg.trust_remote_code, dtype=dtype, load_in_4bit=cfg.load_in_4bit)
    use_cache = bool(getattr(model.config, "use_cache", True))
    n_params = sum(p.numel() for p in model.parameters())
    reporter.log(f"Loaded base model from {base} ({model_json.get('model_type')}, {n_params / 1e6:.1f}M parameters)")

    targets = resolve_targets(model, cfg.target_modules)
    if cfg.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model = add_lora(model, cfg, targets)
    if not cfg.load_in_4bit:
        model.to(device)
    params = trainable_parameters(model)
    leaves = sorted({t.rsplit(".", 1)[-1] for t in targets})
    reporter.log(
        f"Injected LoRA adapters with rank={cfg.lora_rank} (alpha={cfg.lora_alpha}, {len(targets)} modules: "
        f"{', '.join(leaves)}; {sum(p.numel() for p in params):,} trainable parameters"
        + (", rsLoRA" if cfg.use_rslora else "") + (", DoRA" if cfg.use_dora else "") + ")"
    )

    pad_id = tokenizer.pad_token_id
    order = EpochShuffle(len(data.train), cfg.seed)
    # Its own generator: starting an epoch then draws no numbers from the global RNG, which the
    # dropout masks use, so a resumed run's masks match an unbroken run's.
    loader = DataLoader(
        data.train, batch_size=cfg.batch_size, sampler=order, collate_fn=lambda b: collate(b, pad_id),
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    # counted on the prepared loader: with several processes each rank gets its share of the batches
    steps_per_epoch = math.ceil(len(loader) / cfg.gradient_accumulation_steps)
    total_steps = cfg.max_train_steps or cfg.epochs * steps_per_epoch
    # Not passed through accelerate.prepare: its wrapper steps a schedule once per process at each
    # optimizer step, which with several processes would run the warm-up and decay too fast.
    # Stepped below once per optimizer step.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, total_steps))
    unwrapped = accelerator.unwrap_model(model)

    step = 0
    if resume_from is not None:
        state = torch.load(resume_from / STATE_FILE, map_location="cpu", weights_only=True)
        try:
            loaded = set_peft_model_state_dict(unwrapped, load_file(str(resume_from / "adapter_model.safetensors")))
            unexpected = list(getattr(loaded, "unexpected_keys", None) or [])
            missing = [k for k in getattr(loaded, "missing_keys", None) or [] if ".lora_" in k]
            if unexpected or missing:
                raise ValueError(f"checkpoint has {unexpected[:2]} extra and lacks {missing[:2]}")
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            detail = " ".join(str(exc).split())[:200]
            raise ConfigError(
                f"resume: {resume_from} does not fit this config (rank, target modules or model differ: {detail})"
            ) from None
        scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        reporter.log(f"Resumed from {resume_from} at step {step}")
    elif cfg.resume == "latest":
        reporter.log(f"resume: latest: no checkpoint in {output_dir / 'checkpoints'} yet, starting at step 0")

    log_dir = Path(cfg.log_dir) if cfg.log_dir else output_dir / "logs"
    output_dir.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(str(log_dir)) if accelerator.is_main_process else None
    samples = SampleWriter(
        sample_prompts(cfg, data, tokenizer), log_dir / "samples.jsonl", tokenizer, cfg.sample_max_tokens, use_cache
    )
    if data.renderer.template is not None and data.uses_template:
        tokenizer.chat_template = data.renderer.template  # the adapter's tokenizer carries what was trained

    def save_adapter(folder: Path, info: dict | None = None) -> None:
        unwrapped.save_pretrained(str(folder), safe_serialization=True)
        tokenizer.save_pretrained(str(folder))
        if info is not None:
            (folder / "training_info.json").write_text(json.dumps(info, indent=2, default=str))

    def checkpoint(at: int) -> Path:
        def write(folder: Path) -> None:
            save_adapter(folder)
            state = {
                "step": at,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(),  # dropout masks continue as in an unbroken run
            }
            if torch.cuda.is_available():
                state["cuda_rng"] = torch.cuda.get_rng_state_all()
            torch.save(state, folder / STATE_FILE)

        return replace_folder(output_dir / "checkpoints" / f"step-{at:06d}", write)

    def run_eval(at: int) -> dict:
        """Eval loss and perplexity on the held-out samples ({} without a validation split). They
        travel in the checkpoint event's data: the daemon protocol has no event kind of their own."""
        if not data.val:
            return {}
        loss, ppl = evaluate(unwrapped, data.val, cfg.batch_size, pad_id, device)
        reporter.log(f"Eval at step {at}: loss {loss:.4f}, perplexity {ppl:.2f} ({len(data.val)} held-out samples)")
        if writer is not None:
            writer.add_scalar("eval/loss", loss, at)
            writer.add_scalar("eval/perplexity", ppl, at)
        eval_losses.append(loss)
        return {"eval_loss": loss, "perplexity": ppl}

    reporter.log(
        f"Training started... total steps: {total_steps} ({len(data.train)} sequences, "
        f"{batch_note(cfg, accelerator.num_processes)})"
    )
    reporter.event("started", total=total_steps, step=step)
    result = TrainResult(output_path=output_dir, deployed_path=None, steps=step)
    eval_losses: list[float] = []
    throughput = Throughput(total_steps)
    model.train()
    window: list[float] = []
    epoch = step // max(steps_per_epoch, 1)
    skip = (step % max(steps_per_epoch, 1)) * cfg.gradient_accumulation_steps
    while step < total_steps and not result.stopped_early:
        # accelerate's loader counts its own epochs (one per pass over *that* loader object) and
        # passes the count to our sampler: tell it the real epoch, or a resumed run reshuffles wrongly.
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        order.set_epoch(epoch)
        for each in (loader, batches):
            if hasattr(each, "set_epoch"):
                each.set_epoch(epoch)
        skip = 0
        for batch in batches:
            with accelerator.accumulate(model):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                total, count = token_loss(logits, batch["labels"])
                if accelerator.num_processes > 1:
                    # the whole batch's mean over answer tokens: the ranks' gradients are averaged,
                    # so each divides its sum by all ranks' tokens and multiplies by the rank count
                    tokens = accelerator.reduce(count.float(), reduction="sum")
                    loss = total / tokens.clamp(min=1) * accelerator.num_processes
                else:
                    loss = total / count.clamp(min=1)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            window.append(loss.detach().item())
            if not accelerator.sync_gradients:
                continue
            step += 1
            step_loss = mean_over_ranks(accelerator, sum(window) / len(window))
            window = []
            result.losses.append(step_loss)
            lr = scheduler.get_last_lr()[0]
            it_s, eta = throughput.tick(step)
            if writer is not None:
                writer.add_scalar("loss", step_loss, step)
                writer.add_scalar("lr", lr, step)
            reporter.event("progress", step=step, total=total_steps, loss=step_loss, lr=lr, it_s=it_s, eta_s=eta)
            if cfg.save_steps and step % cfg.save_steps == 0 and step < total_steps:
                if accelerator.is_main_process:
                    path = checkpoint(step)
                    result.checkpoints.append(path)
                    reporter.log(f"Saved checkpoint {path}")
                    reporter.event("checkpoint", step=step, path=str(path), **run_eval(step))
                    samples.run(unwrapped, step, reporter, writer)
            if step >= total_steps:
                break
            if stop_all(accelerator, reporter):
                reporter.log(f"Stop requested: saving what was trained after {step} steps")
                result.stopped_early = True
                break
        epoch += 1

    result.steps = step
    outputs: dict[str, str] = {}
    if accelerator.is_main_process:
        run_eval(step)
        samples.run(unwrapped, step, reporter, writer)
        if writer is not None:
            writer.close()
        info = run_info(cfg, started_at, step, data, result.losses, eval_losses)
        write = lambda folder: save_adapter(folder, info)  # noqa: E731
        result.output_path = publish_new_folder(output_dir, cfg.resolved_output_name, write)
        reporter.log(f"Saved LoRA adapter to {result.output_path}")
        outputs["lora"] = str(result.output_path)
        if cfg.deploy_dir:
            result.deployed_path = publish_new_folder(Path(cfg.deploy_dir), result.output_path.name, write)
            reporter.log(f"Deployed to {result.deployed_path}")
        outputs["deployed"] = str(result.deployed_path or "")
        if cfg.merge_output:
            merged = export_merged(unwrapped, tokenizer, base, output_dir, f"{result.output_path.name}-merged")
            reporter.log(f"Saved merged model to {merged}")
            outputs["merged"] = str(merged)
    reporter.event("finished", outputs=outputs, steps=step)
    accelerator.wait_for_everyone()
    return result


def run_info(cfg: TrainConfig, started_at: str, steps: int, data: LLMData, losses, eval_losses) -> dict:
    """training_info.json beside the adapter: what was trained, from what, and how it went."""
    return {
        "trainer": "lora-daemon",
        "base_model": str(cfg.base_model),
        "started_at": started_at,
        "steps": steps,
        "train_sequences": len(data.train),
        "val_samples": len(data.val),
        "final_loss": losses[-1] if losses else None,
        "eval_loss": eval_losses[-1] if eval_losses else None,
        "config": cfg.to_dict(),
    }


def export_merged(peft_model, tokenizer, base: Path, output_dir: Path, stem: str) -> Path:
    """The base model with the LoRA merged in, as a plain Transformers folder (safetensors)."""
    merged = peft_model.merge_and_unload()

    def write(folder: Path) -> None:
        merged.save_pretrained(str(folder), safe_serialization=True)
        tokenizer.save_pretrained(str(folder))
        for code in remote_code_files(base):  # a remote-code model needs its code beside the weights
            if not (folder / code.name).exists():
                shutil.copy2(code, folder / code.name)

    return publish_new_folder(output_dir, stem, write)
