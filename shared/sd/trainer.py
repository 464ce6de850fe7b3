"""The SD LoRA training loop: frozen base, LoRA on the UNet, AdamW + warm-up + cosine, noise loss."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path

from shared.config import TrainConfig
from shared.files import atomic_write, publish_new
from shared.reporting import ConsoleReporter, Reporter, Throughput, TrainResult
from shared.sd.base_model import SDModel, load_sd_model
from shared.sd.dataset import ImageCaptionDataset, scan_dataset
from shared.sd.kohya_export import kohya_state_dict, lora_metadata, save_lora_file
from shared.sd.lora import inject_lora, kohya_unet_targets


def encode_prompts(model: SDModel, input_ids):
    """SD1.x conditioning: the text encoder's last hidden state."""
    return model.text_encoders[0](input_ids)[0]


def noise_loss(model: SDModel, latents, encoder_hidden_states, generator=None):
    """One diffusion training loss: noise the latents at random timesteps, predict noise (or v)."""
    import torch
    import torch.nn.functional as F

    sched = model.noise_scheduler
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    timesteps = torch.randint(
        0, sched.config.num_train_timesteps, (latents.shape[0],), generator=generator, device=latents.device
    )
    noisy = sched.add_noise(latents, noise, timesteps)
    pred = model.unet(noisy, timesteps, encoder_hidden_states).sample
    target = noise if model.prediction_type == "epsilon" else sched.get_velocity(latents, noise, timesteps)
    return F.mse_loss(pred.float(), target.float())


def export_lora(model: SDModel, cfg: TrainConfig, path_or_folder: Path, *, started_at: str, steps: int,
                n_images: int, unique: bool) -> Path:
    """Save the UNet LoRA in kohya format. `unique=True` picks a new name (name_2, ...) in the folder."""
    tensors = kohya_state_dict(model.unet, "lora_unet", cfg.lora_alpha)

    def metadata(name: str) -> dict[str, str]:
        return lora_metadata(
            arch=model.arch,
            output_name=name,
            rank=cfg.lora_rank,
            alpha=cfg.lora_alpha,
            base_model=cfg.base_model,
            resolution=cfg.resolution,
            training={
                "ss_training_started_at": started_at,
                "ss_learning_rate": str(cfg.learning_rate),
                "ss_unet_lr": str(cfg.learning_rate),
                "ss_lr_scheduler": cfg.lr_scheduler,
                "ss_max_train_steps": str(steps),
                "ss_num_train_images": str(n_images),
                "ss_batch_size_per_device": str(cfg.batch_size),
                "ss_gradient_accumulation_steps": str(cfg.gradient_accumulation_steps),
                "ss_seed": str(cfg.seed),
                "ss_network_dropout": str(cfg.lora_dropout),
                "ss_mixed_precision": cfg.mixed_precision,
                "ss_network_args": json.dumps({"init": cfg.lora_init}),
            },
        )

    if unique:
        folder, stem = Path(path_or_folder), cfg.resolved_output_name
        return publish_new(folder, stem, ".safetensors", lambda p, name: save_lora_file(p, tensors, metadata(name)))
    path = Path(path_or_folder)
    return atomic_write(path, lambda p: save_lora_file(p, tensors, metadata(path.stem)))


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


def train_sd(cfg: TrainConfig, reporter: Reporter | None = None) -> TrainResult:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from torch.utils.tensorboard import SummaryWriter

    reporter = reporter or ConsoleReporter()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        cpu=cfg.device == "cpu",
    )
    device = accelerator.device
    reporter.log(f"Using device: {device}")
    set_seed(cfg.seed)

    scan = scan_dataset(cfg.train_data_dir, cfg.metadata_path)
    reporter.log(scan.summary())

    model = load_sd_model(cfg.base_model, cfg.model_config)
    reporter.log(f"Loaded base model from {cfg.base_model} ({model.arch}, {model.prediction_type})")
    text_encoder = model.text_encoders[0]
    for frozen in (model.vae, text_encoder):
        frozen.requires_grad_(False).eval().to(device)

    targets = kohya_unet_targets(model.unet)
    params = inject_lora(
        model.unet, targets, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, init=cfg.lora_init
    )
    reporter.log(f"Injected LoRA adapters with rank={cfg.lora_rank} (alpha={cfg.lora_alpha}, {len(targets)} UNet modules)")
    if cfg.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    model.unet.train()

    dataset = ImageCaptionDataset(scan.items, model.tokenizers[0], cfg.resolution)
    loader = DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=False,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    steps_per_epoch = math.ceil(len(loader) / cfg.gradient_accumulation_steps)
    total_steps = cfg.max_train_steps or cfg.epochs * steps_per_epoch

    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, total_steps))
    model.unet, optimizer, loader, scheduler = accelerator.prepare(model.unet, optimizer, loader, scheduler)

    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    log_dir = Path(cfg.log_dir) if cfg.log_dir else output_dir / "logs"
    writer = SummaryWriter(str(log_dir)) if accelerator.is_main_process else None
    unwrapped = SDModel(**{**model.__dict__, "unet": accelerator.unwrap_model(model.unet)})

    reporter.log(
        f"Training started... total steps: {total_steps} "
        f"({len(dataset)} images, batch {cfg.batch_size} x {cfg.gradient_accumulation_steps} accumulation)"
    )
    reporter.event("started", total=total_steps)
    result = TrainResult(output_path=output_dir, deployed_path=None, steps=0)
    throughput = Throughput(total_steps)
    scaling = model.vae.config.scaling_factor
    step, window = 0, []
    epoch = 0
    while step < total_steps and not result.stopped_early:
        for batch in loader:
            with accelerator.accumulate(model.unet):
                with torch.no_grad():
                    pixels = batch["pixel_values"].to(device)
                    latents = model.vae.encode(pixels).latent_dist.sample() * scaling
                    cond = encode_prompts(model, batch["input_ids"].to(device))
                loss = noise_loss(model, latents, cond)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            window.append(loss.detach().item())
            if not accelerator.sync_gradients:
                continue
            step += 1
            step_loss = sum(window) / len(window)
            window = []
            result.losses.append(step_loss)
            lr = scheduler.get_last_lr()[0]
            it_s, eta = throughput.tick(step)
            if writer is not None:
                writer.add_scalar("loss", step_loss, step)
                writer.add_scalar("lr", lr, step)
            reporter.event("progress", step=step, total=total_steps, loss=step_loss, lr=lr, it_s=it_s, eta_s=eta)
            if cfg.save_steps and step % cfg.save_steps == 0 and step < total_steps:
                path = output_dir / "checkpoints" / f"{cfg.resolved_output_name}-step{step:06d}.safetensors"
                export_lora(unwrapped, cfg, path, started_at=started_at, steps=step, n_images=len(dataset), unique=False)
                result.checkpoints.append(path)
                reporter.log(f"Saved checkpoint {path}")
                reporter.event("checkpoint", step=step, path=str(path))
            if step >= total_steps:
                break
            if reporter.stop_requested():
                reporter.log(f"Stop requested: saving what was trained after {step} steps")
                result.stopped_early = True
                break
        epoch += 1

    result.steps = step
    if writer is not None:
        writer.close()
    export = dict(started_at=started_at, steps=step, n_images=len(dataset))
    result.output_path = export_lora(unwrapped, cfg, output_dir, unique=True, **export)
    reporter.log(f"Saved LoRA to {result.output_path} (use it as <lora:{result.output_path.stem}:0.8>)")
    if cfg.deploy_dir:
        result.deployed_path = export_lora(unwrapped, cfg, Path(cfg.deploy_dir), unique=True, **export)
        reporter.log(f"Deployed to {result.deployed_path} (use it as <lora:{result.deployed_path.stem}:0.8>)")
    outputs = {"lora": str(result.output_path), "deployed": str(result.deployed_path or "")}
    reporter.event("finished", outputs=outputs, steps=step)
    return result
