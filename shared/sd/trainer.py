"""The SD LoRA training loop (SD1.x, SD2.x epsilon/v, SDXL).

Frozen base, LoRA on the UNet (and optionally the text encoders), AdamW with warm-up and a decay
schedule, the noise (or v) loss with optional noise offset and min-SNR weighting. Images are
bucketed by aspect ratio; latents and text conditioning can be cached. Every `save_steps` a
loadable LoRA and a resumable training state are written; the end writes the LoRA with kohya
metadata, its sidecars, and a before/after grid when sample prompts are given.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

from shared.config import TrainConfig
from shared.distributed import batch_note, mean_over_ranks, stop_all
from shared.errors import ConfigError
from shared.files import atomic_write, publish_new
from shared.reporting import ConsoleReporter, Reporter, Throughput, TrainResult
from shared.sd import checkpoints as ckpt
from shared.sd.base_model import SDModel, load_sd_model
from shared.sd.buckets import BucketPlan, assign_buckets, epoch_batches
from shared.sd.caching import LatentCache, module_hash
from shared.sd.conditioning import encode_text, sdxl_time_ids, unet_kwargs
from shared.sd.dataset import (
    dataset_dirs,
    image_size,
    load_pixels,
    plan_crop,
    process_caption,
    scan_dataset,
    tag_frequency,
    tokenize,
)
from shared.sd.kohya_export import lora_metadata, model_lora_tensors, save_lora_file
from shared.sd.lora import (
    inject_lora,
    kohya_conv_targets,
    kohya_text_encoder_targets,
    kohya_unet_targets,
    lora_state,
)

# ---------------------------------------------------------------------------------------------
# Loss


def noise_loss(model: SDModel, latents, encoder_hidden_states, generator=None, *, noise_offset: float = 0.0,
               min_snr_gamma: float | None = None, unet_extra: dict | None = None, unet=None):
    """One diffusion training loss: noise the latents at random timesteps, predict noise (or v).

    `generator` is one generator for the batch, or a list with one per sample (the trainer's way: a
    sample's noise then depends on the sample alone, not on which process or batch slot it lands in).
    `unet` is the module to call (the data-parallel wrapper); default model.unet."""
    import torch
    import torch.nn.functional as F

    sched = model.noise_scheduler
    device = latents.device
    per_sample = isinstance(generator, (list, tuple))

    def draw(fn, shape):
        if per_sample:
            return torch.cat([fn((1, *shape[1:]), generator=g) for g in generator])
        return fn(shape, generator=generator)

    noise = draw(torch.randn, latents.shape).to(device, latents.dtype)
    if noise_offset:
        # a per-channel shift of the noise lets the model learn overall brightness
        noise = noise + noise_offset * draw(torch.randn, (*latents.shape[:2], 1, 1)).to(device)
    steps = sched.config.num_train_timesteps
    timesteps = draw(lambda shape, generator: torch.randint(0, steps, shape, generator=generator),
                     (latents.shape[0],)).to(device)
    noisy = sched.add_noise(latents, noise, timesteps)
    pred = (unet or model.unet)(noisy, timesteps, encoder_hidden_states, **(unet_extra or {})).sample
    v = model.prediction_type == "v_prediction"
    target = sched.get_velocity(latents, noise, timesteps) if v else noise
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
    if min_snr_gamma:
        alphas = sched.alphas_cumprod.to(device)[timesteps]
        snr = alphas / (1 - alphas)
        weight = torch.clamp(snr, max=min_snr_gamma) / (snr + 1 if v else snr)
        loss = loss * weight
    return loss.mean()


def _lr_lambda(cfg: TrainConfig, total_steps: int):
    warmup = cfg.lr_warmup_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.lr_scheduler in ("constant", "constant_with_warmup"):
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class Sample:
    """What one image contributes to one step."""

    index: int
    caption: str
    flip: bool
    resized: tuple[int, int]
    crop: tuple[int, int]  # (top, left)
    noise_seed: int = 0  # latent sample, noise and timestep of this sample at this step


class TrainData:
    """Items, their buckets, the per-epoch batch order and per-step augmentation, all from the seed.

    With several processes a batch is the global one (batch_size x processes images): every rank
    plans the same batches and trains its own slice of each (`shard`), so all ranks take the same
    number of steps and together see what one process with the whole batch would."""

    def __init__(self, cfg: TrainConfig, items, plan: BucketPlan, sizes, processes: int = 1, rank: int = 0):
        self.cfg = cfg
        self.items = items
        self.plan = plan
        self.sizes = sizes
        self.repeats = [item.repeats for item in items]
        self.processes, self.rank = processes, rank

    def batches(self, epoch: int) -> list[list[int]]:
        return epoch_batches(self.plan.buckets, self.repeats, self.cfg.batch_size * self.processes,
                             self.cfg.seed, epoch)

    def shard(self, samples: list[Sample]) -> tuple[list[Sample], float]:
        """This rank's part of a global batch, and the factor on its mean loss that makes the ranks'
        averaged gradients equal the whole batch's mean. A bucket's last batch may leave a rank with
        nothing: it trains the batch's first sample with weight 0, so every rank still joins each
        gradient exchange."""
        size = self.cfg.batch_size
        mine = samples[self.rank * size : (self.rank + 1) * size]
        if not mine:
            return samples[:1], 0.0
        return mine, len(mine) * self.processes / len(samples)

    def fixed_caption(self, index: int) -> str:
        return process_caption(self.items[index].caption, trigger_word=self.cfg.trigger_word, shuffle=False,
                               keep_tokens=0, dropout_rate=0.0, rng=random.Random(0))

    def sample(self, epoch: int, batch: int, slot: int, index: int) -> Sample:
        cfg = self.cfg
        rng = random.Random(f"{cfg.seed}-{epoch}-{batch}-{slot}")
        caption = process_caption(self.items[index].caption, trigger_word=cfg.trigger_word,
                                  shuffle=cfg.shuffle_caption, keep_tokens=cfg.keep_tokens,
                                  dropout_rate=cfg.caption_dropout_rate, rng=rng)
        flip = cfg.random_flip and rng.random() < 0.5
        resized, crop = plan_crop(self.sizes[index], self.plan.buckets[index], random_crop=cfg.random_crop, rng=rng)
        return Sample(index, caption, flip, resized, crop, noise_seed=rng.getrandbits(63))


def plan_data(cfg: TrainConfig, model: SDModel, reporter: Reporter, processes: int = 1, rank: int = 0):
    scan = scan_dataset(cfg.train_data_dir, cfg.metadata_path, cfg.caption_extension)
    reporter.log(scan.summary())
    # a bucket side must survive the VAE's and the UNet's downsampling (the resolution itself was checked
    # against the same multiple, read from the checkpoint's header, by the pre-flight)
    vae_factor = 2 ** (len(model.vae.config.block_out_channels) - 1)
    need = vae_factor * 2 ** (len(model.unet.config.down_block_types) - 1)
    step = math.ceil(cfg.bucket_reso_steps / need) * need
    min_size = max(step, min(cfg.min_bucket_reso, cfg.resolution // 2) // step * step)
    max_size = max(cfg.max_bucket_reso, cfg.resolution)
    sizes = [image_size(item.path) for item in scan.items]
    plan = assign_buckets(sizes, resolution=cfg.resolution, step=step, min_size=min_size, max_size=max_size,
                          enabled=cfg.enable_bucket, upscale=cfg.bucket_upscale)
    data = TrainData(cfg, scan.items, plan, sizes, processes, rank)
    reporter.log(f"Buckets: {plan.summary(data.repeats)}")
    reporter.event("buckets", histogram={f"{w}x{h}": n for (w, h), n in sorted(plan.histogram(data.repeats).items())})
    return data


# ---------------------------------------------------------------------------------------------
# Training


def _place(module, device, dtype) -> None:
    import torch

    module.to(device)
    if dtype != torch.float32:  # frozen base weights in the mixed-precision type save memory
        module.to(dtype)


class SDTraining:
    def __init__(self, cfg: TrainConfig, reporter: Reporter):
        self.cfg = cfg
        self.reporter = reporter

    # --- set-up ------------------------------------------------------------------------------
    def setup(self) -> None:
        import torch
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        cfg = self.cfg
        self.accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.device == "cpu")
        self.device = self.accelerator.device
        self.reporter.log(f"Using device: {self.device}")
        self._check_optimizer()
        set_seed(cfg.seed)
        self.model = model = load_sd_model(cfg.base_model, cfg.model_config, cfg.prediction_type)
        self.reporter.log(f"Loaded base model from {cfg.base_model} ({model.arch}, {model.prediction_type})")
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
        if self.device.type == "cpu":
            self.weight_dtype = torch.float32
        # SDXL's VAE overflows in fp16: keep it in fp32 (its config says force_upcast)
        vae_dtype = torch.float32 if getattr(model.vae.config, "force_upcast", False) else self.weight_dtype
        model.vae.requires_grad_(False).eval()
        _place(model.vae, self.device, vae_dtype)
        for encoder in model.text_encoders:
            _place(encoder.requires_grad_(False).eval(), self.device, self.weight_dtype)
        _place(model.unet, self.device, self.weight_dtype)

        self.data = plan_data(cfg, model, self.reporter, self.accelerator.num_processes,
                              self.accelerator.process_index)
        self._inject()
        batches = len(self.data.batches(0))
        self.steps_per_epoch = math.ceil(batches / cfg.gradient_accumulation_steps)
        self.total_steps = cfg.max_train_steps or cfg.epochs * self.steps_per_epoch
        self._optimizer()
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def _check_optimizer(self) -> None:
        if self.cfg.optimizer != "adamw8bit":
            return
        if self.device.type != "cuda":
            raise ConfigError("optimizer: adamw8bit needs a CUDA GPU (bitsandbytes); use `adamw` on this device")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError("optimizer: adamw8bit needs the bitsandbytes package "
                              "(pip install bitsandbytes) or use `adamw`") from None

    def _inject(self) -> None:
        cfg, model = self.cfg, self.model
        targets = kohya_unet_targets(model.unet)
        conv = kohya_conv_targets(model.unet) if cfg.conv_rank else []
        lora_args = dict(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, init=cfg.lora_init,
                         init_std=cfg.lora_init_std, dora=cfg.use_dora)
        self.unet_params = inject_lora(model.unet, targets, conv_targets=conv, conv_rank=cfg.conv_rank,
                                       conv_alpha=cfg.conv_alpha, **lora_args)
        what = f"{len(targets)} UNet modules" + (f" + {len(conv)} LoCon modules" if conv else "")
        self.te_params = []
        if cfg.train_text_encoder:
            for encoder in model.text_encoders:
                te_targets = kohya_text_encoder_targets(encoder)
                self.te_params += inject_lora(encoder, te_targets, **lora_args)
                what += f" + {len(te_targets)} text-encoder modules"
                encoder.train()
        for p in self.unet_params + self.te_params:  # LoRA weights train in fp32 under autocast
            p.data = p.data.float()
        self.reporter.log(f"Injected LoRA adapters with rank={cfg.lora_rank} (alpha={cfg.lora_alpha}, {what})")
        if cfg.gradient_checkpointing:
            model.unet.enable_gradient_checkpointing()
        model.unet.train()
        self.trained_encoders = list(model.text_encoders) if cfg.train_text_encoder else []

    def _optimizer(self) -> None:
        import torch

        cfg = self.cfg
        groups = [{"params": self.unet_params, "lr": cfg.learning_rate}]
        if self.te_params:
            groups.append({"params": self.te_params, "lr": cfg.text_encoder_lr or cfg.learning_rate})
        if cfg.optimizer == "adamw8bit":
            import bitsandbytes as bnb  # checked in _check_optimizer before the model loaded

            optimizer = bnb.optim.AdamW8bit(groups, weight_decay=cfg.weight_decay)
        else:
            optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, self.total_steps))
        prepared = self.accelerator.prepare(self.model.unet, optimizer, *self.trained_encoders)
        self.train_unet = prepared[0]  # the data-parallel wrapper: its forward is what syncs gradients
        self.optimizer = prepared[1]
        self.params = self.unet_params + self.te_params

    # --- caches ------------------------------------------------------------------------------
    def build_caches(self) -> None:
        """Encode every image (and caption) once when asked; afterwards no step runs the VAE
        (or the text encoders)."""
        import torch

        cfg, model = self.cfg, self.model
        self.latent_cache = None
        self.text_cache = None
        if cfg.cache_latents != "no":
            self.latent_cache = LatentCache(cfg.cache_latents, cfg.cache_dir, module_hash(model.vae))
            for index, item in enumerate(self.data.items):
                bucket = self.data.plan.buckets[index]
                resized, crop = plan_crop(self.data.sizes[index], bucket, random_crop=False, rng=None)
                for flip in (False, True) if cfg.random_flip else (False,):
                    key = self.latent_cache.key(item.path, bucket, crop, flip)
                    if self.latent_cache.get(key) is None:
                        pixels = load_pixels(item.path, bucket, resized, crop, flip)[None]
                        with torch.no_grad():
                            dist = model.vae.encode(pixels.to(self.device, model.vae.dtype)).latent_dist
                        self.latent_cache.put(key, dist.parameters[0].float())
            c = self.latent_cache
            self.reporter.log(f"Latent cache ({cfg.cache_latents}): {c.hits} reused, {c.new} encoded")
        if cfg.cache_text_encoder_outputs:
            self.text_cache = {}
            captions = sorted({self.data.fixed_caption(i) for i in range(len(self.data.items))})
            with torch.no_grad():
                for caption in captions:
                    ehs, pooled = encode_text(model, tokenize(model.tokenizers, [caption]))
                    self.text_cache[caption] = (ehs[0].cpu(), None if pooled is None else pooled[0].cpu())
            if self.device.type != "cpu":
                for encoder in model.text_encoders:
                    encoder.to("cpu")
            self.reporter.log(f"Text-encoder cache: {len(captions)} captions encoded")
        self.reporter.event("cached", latents=self.latent_cache is not None, text=self.text_cache is not None)

    # --- one batch ---------------------------------------------------------------------------
    def batch_inputs(self, samples: list[Sample]):
        import torch
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        model, data = self.model, self.data
        bucket = data.plan.buckets[samples[0].index]
        if self.latent_cache is not None:
            params = []
            for s in samples:
                key = self.latent_cache.key(data.items[s.index].path, bucket, s.crop, s.flip)
                cached = self.latent_cache.get(key)
                if cached is None:
                    raise RuntimeError(f"latent cache miss for {data.items[s.index].path}")  # a bug, not user input
                params.append(cached)
            params = torch.stack(params).to(self.device)
        else:
            pixels = torch.stack([load_pixels(data.items[s.index].path, bucket, s.resized, s.crop, s.flip)
                                  for s in samples])
            with torch.no_grad():
                params = model.vae.encode(pixels.to(self.device, model.vae.dtype)).latent_dist.parameters.float()
        # sampling from the stored distribution with each sample's own generator: cached == uncached,
        # and a sample draws the same numbers whichever process trains it
        generators = self.generators(samples)
        latents = torch.cat([DiagonalGaussianDistribution(params[i : i + 1].cpu()).sample(generator=g)
                             for i, g in enumerate(generators)])
        latents = latents.to(self.device) * model.vae.config.scaling_factor
        captions = [s.caption for s in samples]
        if self.text_cache is not None:
            ehs = torch.stack([self.text_cache[c][0] for c in captions]).to(self.device)
            pooled = (torch.stack([self.text_cache[c][1] for c in captions]).to(self.device)
                      if model.is_sdxl else None)
        elif self.trained_encoders:
            ehs, pooled = encode_text(model, tokenize(model.tokenizers, captions))
        else:
            with torch.no_grad():
                ehs, pooled = encode_text(model, tokenize(model.tokenizers, captions))
        extra = {}
        if model.is_sdxl:
            target = [(bucket[1], bucket[0])] * len(samples)
            originals = [(data.sizes[s.index][1], data.sizes[s.index][0]) for s in samples]
            time_ids = sdxl_time_ids(originals, [s.crop for s in samples], target, self.device)
            extra = unet_kwargs(model, pooled.to(self.weight_dtype), time_ids.to(self.weight_dtype))
        return latents.to(self.weight_dtype), ehs.to(self.weight_dtype), extra, generators

    @staticmethod
    def generators(samples: list[Sample]):
        import torch

        return [torch.Generator().manual_seed(s.noise_seed) for s in samples]

    def loss(self, samples: list[Sample]):
        latents, ehs, extra, generators = self.batch_inputs(samples)
        with self.accelerator.autocast():
            return noise_loss(self.model, latents, ehs, generators, noise_offset=self.cfg.noise_offset,
                              min_snr_gamma=self.cfg.min_snr_gamma, unet_extra=extra, unet=self.train_unet)

    def sync_text_encoder_grads(self) -> None:
        """The text encoders run outside the data-parallel wrapper (encode_text calls them directly):
        average their LoRA gradients over the ranks here."""
        if self.accelerator.num_processes == 1:
            return
        for p in self.te_params:
            if p.grad is not None:
                p.grad = self.accelerator.reduce(p.grad, reduction="mean")

    # --- states ------------------------------------------------------------------------------
    def fingerprint(self) -> dict:
        cfg = self.cfg
        return {"base_model": Path(cfg.base_model).name, "lora_rank": cfg.lora_rank, "conv_rank": cfg.conv_rank,
                "train_text_encoder": cfg.train_text_encoder, "batch_size": cfg.batch_size,
                "gradient_accumulation_steps": cfg.gradient_accumulation_steps, "images": len(self.data.items),
                # a state's place in the data order counts global batches of batch_size x processes
                **({"processes": self.data.processes} if self.data.processes > 1 else {})}

    def all_lora_state(self) -> dict:
        out = {f"unet.{k}": v for k, v in lora_state(self.model.unet).items()}
        for i, encoder in enumerate(self.trained_encoders):
            out.update({f"te{i}.{k}": v for k, v in lora_state(encoder).items()})
        return out

    def save_state(self, folder: Path, step: int, position: dict) -> Path:
        """A resumable state: `position` says where in the data order the next step starts."""
        state = ckpt.save_state(folder, step, lora=self.all_lora_state(), optimizer=self.optimizer,
                                scheduler=self.scheduler, rng=ckpt.rng_state(self.generator),
                                trainer={**position, "fingerprint": self.fingerprint()})
        ckpt.prune(folder, self.cfg.save_last_n, self.cfg.resolved_output_name)
        return state

    def restore(self, path: Path) -> dict:
        import torch

        state = ckpt.load_state(path)
        trainer = state["trainer"]
        saved = {"processes": 1, **trainer.get("fingerprint", {})}
        mismatch = {k: (v, saved.get(k)) for k, v in {"processes": 1, **self.fingerprint()}.items()
                    if saved.get(k) != v}
        if mismatch:
            details = ", ".join(f"{k}: state has {old!r}, config has {new!r}" for k, (new, old) in mismatch.items())
            raise ConfigError(f"resume: {path} was trained with other settings ({details})")
        modules = {"unet": self.model.unet, **{f"te{i}": e for i, e in enumerate(self.trained_encoders)}}
        params = {f"{prefix}.{n}": p for prefix, m in modules.items() for n, p in m.named_parameters()}
        if set(state["lora"]) != set(self.all_lora_state()):
            raise ConfigError(f"resume: {path} holds LoRA weights for other modules than this config trains")
        with torch.no_grad():
            for name, tensor in state["lora"].items():
                params[name].copy_(tensor)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        ckpt.restore_rng(state["rng"], self.generator)
        return trainer


def train_sd(cfg: TrainConfig, reporter: Reporter | None = None) -> TrainResult:
    from torch.utils.tensorboard import SummaryWriter

    reporter = reporter or ConsoleReporter()
    run = SDTraining(cfg, reporter)
    run.setup()
    data, accelerator = run.data, run.accelerator
    output_dir = Path(cfg.output_dir)
    checkpoint_dir = output_dir / "checkpoints"
    output_dir.mkdir(parents=True, exist_ok=True)
    log_dir = Path(cfg.log_dir) if cfg.log_dir else output_dir / "logs"
    writer = SummaryWriter(str(log_dir)) if accelerator.is_main_process else None

    step, epoch, next_batch, losses = 0, 0, 0, []
    started_at = str(time.time())
    resume_from = ckpt.resolve_resume(cfg.resume, checkpoint_dir)
    if cfg.resume and resume_from is None:
        reporter.log(f"resume: no training state in {checkpoint_dir} yet: starting fresh")
    if resume_from is not None:
        trainer = run.restore(resume_from)
        step, epoch, next_batch = trainer["step"], trainer["epoch"], trainer["next_batch"]
        losses, started_at = trainer.get("losses", []), trainer.get("started_at", started_at)
        reporter.log(f"Resumed from {resume_from} at step {step}")
    with accelerator.main_process_first():  # one process fills a disk cache, the others read it
        run.build_caches()

    total = run.total_steps
    n_weighted = sum(data.repeats)
    main = accelerator.is_main_process
    reporter.log(
        f"Training started... total steps: {total} ({len(data.items)} images, {n_weighted} with repeats, "
        f"{batch_note(cfg, accelerator.num_processes)})"
    )
    reporter.event("started", total=total, step=step)
    result = TrainResult(output_path=output_dir, deployed_path=None, steps=step, losses=list(losses))
    throughput = Throughput(total)
    accum = cfg.gradient_accumulation_steps
    exporter = Exporter(cfg, run, started_at)

    while step < total and not result.stopped_early:
        batches = data.batches(epoch)
        window = []
        for b in range(next_batch, len(batches)):
            samples = [data.sample(epoch, b, slot, index) for slot, index in enumerate(batches[b])]
            mine, weight = data.shard(samples)
            loss = run.loss(mine) * weight
            accelerator.backward(loss / accum)
            window.append(loss.detach().item())
            if (b + 1) % accum and b + 1 < len(batches):
                continue
            run.sync_text_encoder_grads()
            if cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(run.params, cfg.max_grad_norm)
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            step += 1
            step_loss = mean_over_ranks(accelerator, sum(window) / len(window))
            window = []
            result.losses.append(step_loss)
            lr = run.scheduler.get_last_lr()[0]
            it_s, eta = throughput.tick(step)
            if writer is not None:
                writer.add_scalar("loss", step_loss, step)
                writer.add_scalar("lr", lr, step)
            reporter.event("progress", step=step, total=total, loss=step_loss, lr=lr, it_s=it_s, eta_s=eta)
            position = {"epoch": epoch, "next_batch": b + 1, "losses": result.losses, "started_at": started_at}
            if main and cfg.save_steps and step % cfg.save_steps == 0 and step < total:
                path = checkpoint_dir / f"{cfg.resolved_output_name}-step{step:06d}.safetensors"
                exporter.write(path, step)
                state = run.save_state(checkpoint_dir, step, position)
                result.checkpoints.append(path)
                reporter.log(f"Saved checkpoint {path} and training state {state.name}")
                reporter.event("checkpoint", step=step, path=str(path), state=str(state))
            if main and cfg.sample_prompts and cfg.sample_every_n_steps and step % cfg.sample_every_n_steps == 0:
                render_samples(run, step, log_dir, writer)
            if step >= total:
                break
            if stop_all(accelerator, reporter):
                reporter.log(f"Stop requested: saving what was trained after {step} steps")
                result.stopped_early = True
                if main and step < total:  # `resume: latest` can continue a stopped run
                    state = run.save_state(checkpoint_dir, step, position)
                    reporter.event("checkpoint", step=step, path="", state=str(state))
                break
        else:
            epoch, next_batch = epoch + 1, 0
            continue
        break

    result.steps = step
    if not main:  # the main process alone writes the outputs
        accelerator.wait_for_everyone()
        return result
    grid_image = before_after_grid(run, output_dir) if cfg.sample_prompts else None
    preview = grid_image[1] if grid_image else None
    if writer is not None:
        writer.close()
    result.output_path = exporter.publish(output_dir, step, preview)
    reporter.log(f"Saved LoRA to {result.output_path} (use it as <lora:{result.output_path.stem}:{cfg.preferred_weight}>)")
    if cfg.deploy_dir:
        result.deployed_path = exporter.publish(Path(cfg.deploy_dir), step, preview)
        reporter.log(f"Deployed to {result.deployed_path} (use it as <lora:{result.deployed_path.stem}:"
                     f"{cfg.preferred_weight}>)")
    outputs = {"lora": str(result.output_path), "deployed": str(result.deployed_path or "")}
    if grid_image:
        outputs["grid"] = str(grid_image[0])
    reporter.event("finished", outputs=outputs, steps=step)
    accelerator.wait_for_everyone()
    return result


# ---------------------------------------------------------------------------------------------
# Output


def legacy_model_hash(path: Path) -> str:
    """kohya's `ss_sd_model_hash` (A1111's old short hash): sha256 of 64 KiB at offset 1 MiB."""
    with open(path, "rb") as fh:
        fh.seek(0x100000)
        return hashlib.sha256(fh.read(0x10000)).hexdigest()[:8]


def addnet_hash(tensors: dict) -> str:
    """kohya's `sshs_model_hash`: sha256 of a safetensors file's bytes after its header. Metadata
    only changes the header, so hashing a metadata-free serialisation gives the file's value."""
    from safetensors.torch import save

    blob = save(tensors)
    n = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(io.BytesIO(blob[8 + n :]).read()).hexdigest()


class Exporter:
    def __init__(self, cfg: TrainConfig, run: SDTraining, started_at: str):
        self.cfg, self.run, self.started_at = cfg, run, started_at
        base = Path(cfg.base_model)
        self.base_hash = legacy_model_hash(base) if base.is_file() else None

    def tensors(self) -> dict:
        run = self.run
        return model_lora_tensors(run.model.arch, run.accelerator.unwrap_model(run.model.unet), run.trained_encoders)

    def metadata(self, name: str, steps: int, tensors: dict) -> dict[str, str]:
        cfg, run = self.cfg, self.run
        data = run.data
        training = {
            "ss_training_started_at": self.started_at,
            "ss_training_finished_at": str(time.time()),
            "ss_learning_rate": str(cfg.learning_rate),
            "ss_unet_lr": str(cfg.learning_rate),
            "ss_text_encoder_lr": str(cfg.text_encoder_lr or cfg.learning_rate) if cfg.train_text_encoder else "0",
            "ss_network_train_unet_only": str(not cfg.train_text_encoder),
            "ss_lr_scheduler": cfg.lr_scheduler,
            "ss_lr_warmup_steps": str(cfg.lr_warmup_steps),
            "ss_max_train_steps": str(run.total_steps),
            "ss_steps": str(steps),
            "ss_epoch": str(math.ceil(steps / max(1, run.steps_per_epoch))),
            "ss_num_train_images": str(sum(data.repeats)),
            "ss_batch_size_per_device": str(cfg.batch_size),
            "ss_gradient_accumulation_steps": str(cfg.gradient_accumulation_steps),
            "ss_seed": str(cfg.seed),
            "ss_network_dropout": str(cfg.lora_dropout),
            "ss_mixed_precision": cfg.mixed_precision,
            "ss_gradient_checkpointing": str(cfg.gradient_checkpointing),
            "ss_noise_offset": str(cfg.noise_offset),
            "ss_min_snr_gamma": str(cfg.min_snr_gamma),
            "ss_v_parameterization": str(run.model.prediction_type == "v_prediction"),
            "ss_clip_skip": "2" if run.model.arch in ("sd2", "sdxl") else "1",
            "ss_optimizer": cfg.optimizer,
            "ss_enable_bucket": str(cfg.enable_bucket),
            "ss_bucket_no_upscale": str(not cfg.bucket_upscale),
            "ss_shuffle_caption": str(cfg.shuffle_caption),
            "ss_keep_tokens": str(cfg.keep_tokens),
            "ss_caption_dropout_rate": str(cfg.caption_dropout_rate),
            "ss_flip_aug": str(cfg.random_flip),
            "ss_random_crop": str(cfg.random_crop),
            "ss_cache_latents": str(cfg.cache_latents != "no"),
            "ss_bucket_info": data.plan.ss_bucket_info(data.repeats),
            "ss_dataset_dirs": json.dumps(dataset_dirs(data.items)),
            "ss_tag_frequency": json.dumps(tag_frequency(data.items)),
            "ss_network_args": json.dumps({
                "init": cfg.lora_init, **({"dora_wd": True} if cfg.use_dora else {}), **({"conv_dim": cfg.conv_rank, "conv_alpha": cfg.conv_alpha or cfg.conv_rank}
                                          if cfg.conv_rank else {}),
            }),
            "sshs_model_hash": addnet_hash(tensors),
        }
        if self.base_hash:
            training["ss_sd_model_hash"] = self.base_hash
        if cfg.trigger_word:
            training["modelspec.trigger_phrase"] = cfg.trigger_word
        if cfg.description:
            training["modelspec.description"] = cfg.description
        return lora_metadata(arch=run.model.metadata_arch, output_name=name, rank=cfg.lora_rank,
                             alpha=cfg.lora_alpha, base_model=cfg.base_model, resolution=cfg.resolution,
                             training=training)

    def write(self, path: Path, steps: int) -> Path:
        tensors = self.tensors()
        return atomic_write(path, lambda p: save_lora_file(p, tensors, self.metadata(path.stem, steps, tensors)))

    def sidecar_json(self, name: str) -> dict:
        cfg, run = self.cfg, self.run
        return {
            "description": cfg.description or f"LoRA trained by lora-daemon on {len(run.data.items)} images",
            "sd version": {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}[run.model.arch],
            "activation text": cfg.trigger_word or "",
            "preferred weight": cfg.preferred_weight,
            "notes": f"base model {Path(cfg.base_model).name}; rank {cfg.lora_rank}, alpha {cfg.lora_alpha}",
        }

    def publish(self, folder: Path, steps: int, preview) -> Path:
        """`<name>.safetensors` under a name not taken yet, its sidecars appearing first."""
        tensors = self.tensors()
        sidecars = {".json": lambda p, name: Path(p).write_text(json.dumps(self.sidecar_json(name), indent=2),
                                                                 encoding="utf-8")}
        if preview is not None:
            sidecars[".preview.png"] = lambda p, name: preview.save(p, format="PNG")
        return publish_new(folder, self.cfg.resolved_output_name, ".safetensors",
                           lambda p, name: save_lora_file(p, tensors, self.metadata(name, steps, tensors)),
                           sidecars)


def _prepare_for_sampling(run: SDTraining):
    """Text encoders back on the device if the cache sent them away."""
    for encoder in run.model.text_encoders:
        encoder.to(run.device)


def render_samples(run: SDTraining, step: int, log_dir: Path, writer) -> list[Path]:
    import numpy as np

    from shared.sd.sampling import render

    cfg = run.cfg
    _prepare_for_sampling(run)
    images = render(run.model, cfg.sample_prompts, seed=cfg.seed, steps=cfg.sample_steps, size=cfg.resolution)
    folder = log_dir / "samples"
    paths = []
    for i, image in enumerate(images):
        path = folder / f"step{step:06d}-{i:02d}.png"
        atomic_write(path, lambda p, im=image: im.save(p, format="PNG"))
        paths.append(path)
        if writer is not None:
            writer.add_image(f"sample/{i:02d}", np.asarray(image), step, dataformats="HWC")
    run.reporter.event("sample", step=step, paths=[str(p) for p in paths])
    return paths


GRID_WEIGHTS = (0.0, 0.5, 0.8, 1.0)


def before_after_grid(run: SDTraining, output_dir: Path):
    """(grid path, preview image): every prompt at LoRA weight 0 (base), 0.5, 0.8 and 1.0."""
    from shared.sd.sampling import grid, render

    cfg = run.cfg
    _prepare_for_sampling(run)
    columns = [render(run.model, cfg.sample_prompts, seed=cfg.seed, steps=cfg.sample_steps, size=cfg.resolution,
                      weight=w) for w in GRID_WEIGHTS]
    rows = [[col[i] for col in columns] for i in range(len(cfg.sample_prompts))]
    image = grid(rows, ["base" if w == 0 else f"LoRA {w}" for w in GRID_WEIGHTS])
    path = output_dir / f"{cfg.resolved_output_name}-grid.png"
    atomic_write(path, lambda p: image.save(p, format="PNG"))
    run.reporter.log(f"Saved before/after grid {path}")
    preferred = min(range(len(GRID_WEIGHTS)), key=lambda i: abs(GRID_WEIGHTS[i] - cfg.preferred_weight))
    return path, rows[0][preferred]
