"""What an SD job leaves for the hosts: the LoRA's header metadata (kohya's training record plus the SD
keys) and the `.json` sidecar AUTOMATIC1111/Forge show on the LoRA's card (the keys both image
families write are in shared/images/training_metadata.py)."""

from __future__ import annotations

from shared.images.training_metadata import common_training_metadata, sidecar_notes
from shared.images.validation_split import validation_metadata
from shared.sd.kohya_export import lora_metadata

SD_VERSIONS = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}


def training_metadata(cfg, model, data, progress, tensors: dict, name: str, base_hash: str | None) -> dict[str, str]:
    """The LoRA's header metadata: what the hosts read, plus kohya's record of how it was trained."""
    network_args = {
        "init": cfg.lora_init, **({"dora_wd": True} if cfg.use_dora else {}),
        **({"conv_dim": cfg.conv_rank, "conv_alpha": cfg.conv_alpha or cfg.conv_rank} if cfg.conv_rank else {}),
    }
    training = common_training_metadata(cfg, data, progress, tensors, base_hash, network_args)
    training.update({
        "ss_noise_offset": str(cfg.noise_offset),
        "ss_min_snr_gamma": str(cfg.min_snr_gamma),
        "ss_v_parameterization": str(model.prediction_type == "v_prediction"),
        "ss_clip_skip": "2" if model.arch in ("sd2", "sdxl") else "1",
        **data.reg_metadata, **validation_metadata(cfg, data.validation),
    })
    return lora_metadata(arch=model.metadata_arch, output_name=name, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                         base_model=cfg.base_model, resolution=cfg.resolution, training=training)


def sidecar_json(cfg, arch: str, images: int) -> dict:
    """`<name>.json`: what the A1111/Forge Lora card shows and fills in."""
    return sidecar_notes(cfg, SD_VERSIONS[arch], images)
