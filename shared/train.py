"""The training loop every task shares, top to bottom: set-up, loop, save.

`run_training(cfg)` trains in this process, or through `accelerate launch` when the config asks for
several processes (shared/training/launch.py); each rank then runs `train_task`. A task (SD, LLM;
shared/training/task.py) supplies what differs between model families: the model, the data, the
adapters, the loss of a batch, samples and the adapter's file format. Everything else is here, once:

- set-up: device and precision, the task's model and data, optimizer and schedule, resume;
- the loop: the global micro-batches of an epoch and this rank's shard of each, gradient
  accumulation (the ranks exchange gradients only on a step's last micro-batch), clipping, the
  schedule, progress; every `save_steps` a loadable checkpoint, a resumable state, keep-last-N and an
  evaluation; samples every `sample_every_n_steps`; a stop request saves a state that
  `resume: latest` continues;
- save: the final evaluation, the task's finish (SD: the grid and preview), publishing into
  `output_dir` and `deploy_dir` under names not taken yet, the task's further exports, the report.

Each evaluation (shared/evaluation: `judge`) runs the task's `evaluate` and judges the adapter from the
pictures or answers of the task's hooks; its scores and verdicts become events here, and keep-last-N
spares the best checkpoint.

Every event goes out through `shared.training.events.send`, so every task streams the same kinds
with the same fields.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

from shared.config import TrainConfig, detect_task
from shared.errors import ConfigError
from shared.evaluation.judge import Judge
from shared.files import atomic_write, journaled, publish_new, publish_new_folder, replace_folder
from shared.reporting import ConsoleReporter, Reporter, Throughput, TrainResult
from shared.training import memory, speed
from shared.training import state as states
from shared.training.commit import Journal
from shared.training.ema import build_ema, exported_weights, final_weights
from shared.training.events import send
from shared.training.launch import launch_training, wants_launch
from shared.training.optim import build_optimizer, build_schedule, check_optimizer, current_lr, schedule_note
from shared.training.precision import setup_precision
from shared.training.ranks import (
    average_gradients,
    batch_note,
    from_main,
    gather_rng,
    global_count,
    mean_over_ranks,
    shard,
    stop_all,
)
from shared.training.task import Progress, Samples, Task, task_class


def run_training(cfg: TrainConfig, reporter: Reporter | None = None, *, deploy_dirs=(),
                 journal: Path | None = None, rerun: bool = False) -> TrainResult:
    """Train the config's task: here, or through `accelerate launch` when it asks for several processes.

    `deploy_dirs`: more folders (a daemon client's Lora folders) that get a copy, as `deploy_dir` does.
    `journal`: where a job that may run again after a kill (a daemon job) records what it publishes,
    and `rerun` says this run is such a second attempt: it then completes, under the same names, what
    the earlier attempt began, and publishes nothing twice (shared/training/commit.py)."""
    if wants_launch(cfg):
        return launch_training(cfg, reporter or ConsoleReporter(), deploy_dirs=deploy_dirs, journal=journal,
                               rerun=rerun)
    return train_task(cfg, reporter, deploy_dirs=deploy_dirs, journal=journal, rerun=rerun)


def train_task(cfg: TrainConfig, reporter: Reporter | None = None, *, deploy_dirs=(), journal: Path | None = None,
               rerun: bool = False) -> TrainResult:
    """Train in this process: one rank of a multi-process run, or all of it (see `run_training`)."""
    from accelerate.utils import set_seed
    from torch.utils.tensorboard import SummaryWriter

    reporter = reporter or ConsoleReporter()
    task = task_class(detect_task(cfg))(cfg, reporter)
    output_dir = Path(cfg.output_dir)
    judge = Judge(cfg, task, output_dir)  # scores, verdicts, best checkpoint, report (shared/evaluation)
    checkpoints = output_dir / "checkpoints"
    log_dir = Path(cfg.log_dir) if cfg.log_dir else output_dir / "logs"
    stem = cfg.resolved_output_name
    resume_from = states.resolve_resume(cfg.resume, checkpoints)  # a bad name is refused before loading

    # --- set-up ----------------------------------------------------------------------------------
    accelerator, precision = setup_precision(cfg)
    reporter.log(f"Using device: {accelerator.device}")
    cfg, notes = speed.resolve_auto(cfg, task.name, precision)  # `auto` speed settings: values and reasons
    task.cfg = cfg
    for note in notes:
        reporter.log(note)
    check_optimizer(cfg, accelerator.device)
    main, processes, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    targets = list({Path(d).resolve(): Path(d) for d in [output_dir, cfg.deploy_dir, *deploy_dirs] if d}.values())
    journal = Journal.open(journal, cfg, targets[1:], rerun=rerun) if main and journal else None
    done = from_main(accelerator, journal.finished() if journal else None)
    if done is not None:  # an earlier attempt of this job trained and published it all: nothing to redo
        reporter.log(f"Already trained and published by an earlier attempt of this job: {done.output_path}")
        send(reporter, "finished", outputs=done.outputs, steps=done.steps, memory=done.memory)
        return done
    # the fastest settings that fit memory_budget; a job that cannot fit is refused here, before it loads
    cfg, plan = memory.plan_memory(cfg, task, precision, resume_from, lambda p: from_main(accelerator, p))
    task.cfg = cfg
    reporter.log(plan.log_line())
    send(reporter, "memory_plan", **plan.event())
    set_seed(cfg.seed)
    task.load(precision)  # what the user must fix is refused here, before anything is written
    global_batch = cfg.batch_size * processes  # every rank plans the same batches, each trains its slice
    accum = cfg.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(task.epoch_batches(0, global_batch)) / accum)
    total = cfg.max_train_steps or cfg.epochs * steps_per_epoch
    progress = Progress(started_at=time.time(), total=total, steps_per_epoch=steps_per_epoch)
    groups = task.param_groups()
    params = [p for group in groups for p in group["params"]]
    optimizer = build_optimizer(cfg, groups, total)
    # Not through accelerate.prepare: its wrapper steps a schedule once per process at each
    # optimizer step, which with several processes would run the warm-up and decay too fast.
    scheduler = build_schedule(cfg, optimizer, total)
    if schedule_note(cfg):
        reporter.log(schedule_note(cfg))
    ema = build_ema(cfg, params)  # None unless use_ema: the average the outputs then show
    if cfg.compile:
        speed.compile_modules(task.train_modules())
    *modules, optimizer = accelerator.prepare(*task.train_modules(), optimizer)
    in_wrappers = {id(p) for module in task.train_modules() for p in module.parameters()}
    unsynced = [p for p in params if id(p) not in in_wrappers]
    send(reporter, "buckets", histogram=task.histogram())
    fingerprint = {"base_model": Path(cfg.base_model).name, "lora_rank": cfg.lora_rank, "batch_size": cfg.batch_size,
                   "gradient_accumulation_steps": accum, "processes": processes, **task.fingerprint(),
                   **({"use_ema": True} if ema is not None else {})}

    # --- resume ----------------------------------------------------------------------------------
    saved = from_main(accelerator, states.load_state(resume_from) if main and resume_from else None)
    if saved is not None:
        progress = _restore(saved, resume_from, task, optimizer, scheduler, fingerprint, progress, ema)
        reporter.log(f"Resumed from {resume_from} at step {progress.step}")
    elif cfg.resume:
        reporter.log(f"resume: no training state in {checkpoints} yet: starting fresh")
    with accelerator.main_process_first():  # one process fills a disk cache, the others read it
        send(reporter, "cached", **task.build_caches())
    if saved is not None:  # after the caches: the random numbers continue where the state left them
        states.restore_rng(saved["rng"]["ranks"][rank])
    output_dir.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(str(log_dir)) if main else None
    reporter.log(f"Training started... total steps: {total} ({batch_note(cfg, processes)})")
    send(reporter, "started", total=total, step=progress.step)
    result = TrainResult(output_path=output_dir, steps=progress.step, losses=progress.losses)
    throughput = Throughput(total)
    saved_state_at = None
    warm_from = time.perf_counter() if cfg.compile else None

    def save_state() -> Path | None:
        """Every rank's RNG to rank 0, which writes the state and applies keep-last-N."""
        rngs = gather_rng(accelerator)
        if not main:
            return None
        trained = {name: tensor.detach() for name, tensor in task.trainable().items()}
        trainer = {"epoch": progress.epoch, "next_batch": progress.next_batch, "losses": progress.losses,
                   "started_at": progress.started_at, "fingerprint": fingerprint}
        path = states.save_state(checkpoints, progress.step, lora=trained, optimizer=optimizer, scheduler=scheduler,
                                 rng={"ranks": rngs}, trainer=trainer,
                                 extras={"ema": ema.state_dict()} if ema is not None else None)
        states.prune(checkpoints, cfg.save_last_n, stem, spare=judge.keep_steps())
        return path

    def show(samples: Samples | None, step: int, metrics: dict | None = None) -> None:
        """An evaluation's numbers into TensorBoard; samples into TensorBoard and a `sample` event."""
        if writer is not None:
            import numpy as np

            for name, value in (metrics or {}).items():
                writer.add_scalar(f"eval/{name.removeprefix('eval_')}", value, step)
            for i, image in enumerate(samples.images if samples else []):
                writer.add_image(f"sample/{i:02d}", np.asarray(image), step, dataformats="HWC")
            if samples and samples.texts:
                text = "\n\n".join(f"**{p}**\n\n{t}" for p, t in zip(samples.prompts, samples.texts))
                writer.add_text("samples", text, step)
        if samples is not None:
            send(reporter, "sample", step=step, paths=[str(p) for p in samples.paths], texts=samples.texts)

    # --- the loop --------------------------------------------------------------------------------
    while progress.step < total and not result.stopped_early:
        batches = task.epoch_batches(progress.epoch, global_batch)
        window: list[float] = []
        for b in range(progress.next_batch, len(batches)):
            mine, weight = shard(batches[b], rank, processes, cfg.batch_size)
            boundary = (b + 1) % accum == 0 or b + 1 == len(batches)
            with contextlib.ExitStack() as no_sync:
                if not boundary:  # gradients stay on each rank until the step's last micro-batch
                    for module in modules:
                        no_sync.enter_context(accelerator.no_sync(module))
                summed, count = task.loss(mine, modules)
                if weight == 0:  # a rank with nothing left in a short batch still joins the exchange
                    summed, count = summed * 0, 0
                loss = summed / global_count(accelerator, count) * processes
                accelerator.backward(loss / accum)
            window.append(loss.detach().item())
            if not boundary:
                continue
            average_gradients(accelerator, unsynced)
            if cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            if ema is not None:
                ema.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            progress.next_batch = b + 1
            step = progress.step
            progress.losses.append(mean_over_ranks(accelerator, sum(window) / len(window)))
            window = []
            lr = current_lr(cfg, optimizer, scheduler)  # Prodigy: its adapted d * lr
            it_s, eta = throughput.tick(step)
            if warm_from is not None:  # the first step traced the model and built its kernels
                warmup, warm_from = time.perf_counter() - warm_from, None
                send(reporter, "compiled", warmup_s=warmup)
                reporter.log(f"compile: the first step, in which torch.compile built its kernels, took {warmup:.1f} s")
            scalars = task.step_scalars()  # every rank: the task's numbers of this step restart
            if writer is not None:
                writer.add_scalar("loss", progress.losses[-1], step)
                writer.add_scalar("lr", lr, step)
                for name, value in scalars.items():
                    writer.add_scalar(f"train/{name}", value, step)
            send(reporter, "progress", step=step, total=total, loss=progress.losses[-1], lr=lr, it_s=it_s, eta_s=eta)
            if cfg.save_steps and step % cfg.save_steps == 0 and step < total:
                with exported_weights(optimizer, ema):
                    path = _write_checkpoint(task, checkpoints, stem, progress) if main else None
                state, saved_state_at = save_state(), step  # keep-last-N then counts this checkpoint too
                if main:
                    result.checkpoints.append(path)
                    reporter.log(f"Saved checkpoint {path} and training state {state.name}")
                    with exported_weights(optimizer, ema):
                        judged = judge.evaluate(step, log_dir, checkpoint=path)
                    # this evaluation may have made this checkpoint the best: the one it replaces is no longer spared
                    states.prune(checkpoints, cfg.save_last_n, stem, spare=judge.keep_steps())
                    send(reporter, "checkpoint", step=step, path=str(path), state=str(state),
                         **judged.evaluation.metrics)
                    for kind, data in judged.events:  # the scores, and each verdict when first found
                        send(reporter, kind, **data)
                    show(judged.evaluation.samples, step, judged.metrics)
            if main and cfg.sample_every_n_steps and step % cfg.sample_every_n_steps == 0:
                with exported_weights(optimizer, ema):
                    show(task.sample(step, log_dir), step)
            if step >= total:
                break
            if stop_all(accelerator, reporter):
                reporter.log(f"Stop requested: saving what was trained after {step} steps")
                result.stopped_early = True
                if saved_state_at != step:  # `resume: latest` continues a stopped run
                    state = save_state()
                    if main:
                        send(reporter, "checkpoint", step=step, path="", state=str(state))
                break
        else:
            progress.epoch, progress.next_batch = progress.epoch + 1, 0
            continue
        break

    # --- save ------------------------------------------------------------------------------------
    result.steps = progress.step
    if not main:  # the main process alone writes the outputs
        accelerator.wait_for_everyone()
        return result
    final_weights(optimizer, ema)  # from here on: the weights the outputs show (EMA, schedule-free average)
    judged = judge.evaluate(progress.step, log_dir)
    for kind, data in judged.events:
        send(reporter, kind, **data)
    show(judged.evaluation.samples, progress.step, judged.metrics)
    finish = judge.annotate(task.finish(output_dir, progress))  # the verdicts in the sidecar's notes
    if writer is not None:
        writer.close()
    with journaled(journal):  # each output under one name, exactly once, whatever is killed when
        result.output_path, *result.deployed = [_publish(task, folder, stem, progress, finish.sidecars)
                                                for folder in targets]
        exports = task.exports(result.output_path, output_dir)
    reporter.log(f"Saved LoRA to {result.output_path}{task.usage(result.output_path)}")
    for path in result.deployed:
        reporter.log(f"Deployed to {path}{task.usage(path)}")
    outputs = {"lora": result.output_path, "deployed": result.deployed_path or "", **finish.outputs, **exports}
    outputs["report"] = judge.conclude(result, outputs, progress)
    reporter.log(f"Report: {outputs['report']}")
    result.outputs = {k: str(v) for k, v in outputs.items()}
    result.memory = memory.compare(plan)  # the estimate beside the measured peak
    reporter.log(memory.comparison_line(result.memory))
    if journal is not None:
        journal.complete(result)
    send(reporter, "finished", outputs=result.outputs, steps=progress.step, memory=result.memory)
    accelerator.wait_for_everyone()
    return result


def _restore(saved: dict, path: Path, task: Task, optimizer, scheduler, fingerprint: dict,
             progress: Progress, ema=None) -> Progress:
    """Put a state's tensors, optimizer and schedule back; refuse one trained with other settings."""
    import torch

    trainer = saved["trainer"]
    before = {"processes": 1, **trainer.get("fingerprint", {})}
    mismatch = {k: (v, before.get(k)) for k, v in fingerprint.items() if before.get(k) != v}
    if mismatch:
        details = ", ".join(f"{k}: state has {old!r}, config has {new!r}" for k, (new, old) in mismatch.items())
        raise ConfigError(f"resume: {path} was trained with other settings ({details})")
    trained = task.trainable()
    if set(saved["lora"]) != set(trained):
        raise ConfigError(f"resume: {path} holds LoRA weights for other modules than this config trains")
    try:
        with torch.no_grad():
            for name, tensor in saved["lora"].items():
                trained[name].copy_(tensor)
        optimizer.load_state_dict(saved["optimizer"])
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"resume: {path} does not fit this config ({' '.join(str(exc).split())[:200]})") from None
    scheduler.load_state_dict(saved["scheduler"])
    if ema is not None:
        ema.load_state_dict(saved["extras"]["ema"])
    return Progress(step=int(trainer["step"]), epoch=int(trainer["epoch"]), next_batch=int(trainer["next_batch"]),
                    losses=list(trainer.get("losses", [])),
                    started_at=float(trainer.get("started_at", progress.started_at)),
                    total=progress.total, steps_per_epoch=progress.steps_per_epoch)


def _write_checkpoint(task: Task, folder: Path, stem: str, progress: Progress) -> Path:
    """The adapter as it is at this step, loadable by the hosts, under checkpoints/ (replacing an
    earlier run's of the same step)."""
    target = folder / states.checkpoint_name(stem, progress.step, task.adapter_suffix)
    name = target.name.removesuffix(task.adapter_suffix) if task.adapter_suffix else target.name
    write = lambda p: task.write_adapter(Path(p), name, progress, final=False)  # noqa: E731
    return atomic_write(target, write) if task.adapter_suffix else replace_folder(target, write)


def _publish(task: Task, folder: Path, stem: str, progress: Progress, sidecars: dict) -> Path:
    """The finished adapter in `folder` as `stem` (or `stem_2`, ... when taken), sidecars first."""
    if task.adapter_suffix:
        return publish_new(folder, stem, task.adapter_suffix,
                           lambda p, name: task.write_adapter(Path(p), name, progress, final=True), sidecars)
    return publish_new_folder(folder, stem, lambda p: task.write_adapter(Path(p), stem, progress, final=True))
