"""What an image LoRA (SD, Flux) records for the hosts: kohya's training metadata keys both families
write, the two hashes kohya computes, and the `.json` sidecar AUTOMATIC1111/Forge show on the LoRA's
card (the `.preview.png` comes from each family's sampling)."""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
from pathlib import Path

from shared.images.dataset import dataset_dirs, tag_frequency
from shared.training.optim import optimizer_name, schedule_name, warmup_steps


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


def common_training_metadata(cfg, data, progress, tensors: dict, base_hash: str | None,
                             network_args: dict) -> dict[str, str]:
    """kohya's record of how an image LoRA was trained, the keys both families share."""
    training = {
        "ss_training_started_at": str(progress.started_at),
        "ss_training_finished_at": str(time.time()),
        "ss_learning_rate": str(cfg.learning_rate),
        "ss_unet_lr": str(cfg.learning_rate),
        "ss_text_encoder_lr": str(cfg.text_encoder_lr or cfg.learning_rate) if cfg.train_text_encoder else "0",
        "ss_network_train_unet_only": str(not cfg.train_text_encoder),
        "ss_lr_scheduler": schedule_name(cfg),
        "ss_lr_warmup_steps": str(warmup_steps(cfg, progress.total)),
        "ss_max_train_steps": str(progress.total),
        "ss_steps": str(progress.step),
        "ss_epoch": str(math.ceil(progress.step / max(1, progress.steps_per_epoch))),
        "ss_num_train_images": str(sum(item.repeats for item in data.training_items)),
        "ss_batch_size_per_device": str(cfg.batch_size),
        "ss_gradient_accumulation_steps": str(cfg.gradient_accumulation_steps),
        "ss_seed": str(cfg.seed),
        "ss_network_dropout": str(cfg.lora_dropout),
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_gradient_checkpointing": str(cfg.gradient_checkpointing),
        "ss_optimizer": optimizer_name(cfg),
        "ss_enable_bucket": str(cfg.enable_bucket),
        "ss_bucket_no_upscale": str(not cfg.bucket_upscale),
        "ss_shuffle_caption": str(cfg.shuffle_caption),
        "ss_keep_tokens": str(cfg.keep_tokens),
        "ss_caption_dropout_rate": str(cfg.caption_dropout_rate),
        "ss_flip_aug": str(cfg.random_flip),
        "ss_random_crop": str(cfg.random_crop),
        "ss_cache_latents": str(cfg.cache_latents != "no"),
        "ss_bucket_info": data.plan.ss_bucket_info(data.repeats),
        "ss_dataset_dirs": json.dumps(dataset_dirs(data.training_items)),
        "ss_tag_frequency": json.dumps(tag_frequency(data.training_items)),
        "ss_network_args": json.dumps(network_args),
        "sshs_model_hash": addnet_hash(tensors),
    }
    if base_hash:
        training["ss_sd_model_hash"] = base_hash
    if cfg.trigger_word:
        training["modelspec.trigger_phrase"] = cfg.trigger_word
    if cfg.description:
        training["modelspec.description"] = cfg.description
    return training


def sidecar_notes(cfg, sd_version: str, images: int) -> dict:
    """`<name>.json`: what the A1111/Forge Lora card shows and fills in. `sd_version` is what the card
    lists the LoRA under (SD1, SD2, SDXL, Flux)."""
    return {
        "description": cfg.description or f"LoRA trained by lora-daemon on {images} images",
        "sd version": sd_version,
        "activation text": cfg.trigger_word or "",
        "preferred weight": cfg.preferred_weight,
        "notes": f"base model {Path(cfg.base_model).name}; rank {cfg.lora_rank}, alpha {cfg.lora_alpha}",
    }
