"""The reference SD LoRA loop, written the textbook way (the shape of diffusers'
`train_text_to_image_lora.py` example): diffusers components from a folder, `unet.add_adapter` with a
peft `LoraConfig`, and every step loads and transforms the image, runs the VAE encoder and the text
encoder, then the UNet forward and backward, AdamW and the cosine schedule through accelerate.

Two choices make its loss curve comparable with ours (benchmarks/sd_compare.py):
- its random numbers come from one seeded generator, drawn in the same order as our trainer draws them
  (latent sample, noise, timestep), where the example uses the global RNG;
- the LoRA targets are the same 192 UNet modules ours trains (kohya's set: attention projections, the
  feed-forward and proj_in/proj_out) rather than the example's four attention projections, and the
  initial LoRA weights can be loaded from a file that our run wrote, so both start from the same point.

`spec["cache"]` makes it the textbook loop at its best: the latent distributions and the encoder hidden
states are computed once before the loop and the VAE and text encoder are dropped; each step still draws
its latent sample, noise and timestep from the same generator, so the curve stays comparable.
"""

from __future__ import annotations

import time
from pathlib import Path

# The modules inside SD1.5's Transformer2D blocks that kohya-style LoRAs train (192 in SD1.5).
TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


def load(folder: Path, dtype=None):
    """The components from a diffusers folder; `dtype`: the frozen weights' type (None: fp32)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    # loading straight into the storage type never holds an fp32 copy (what a careful user does)
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=dtype)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype)
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    return tokenizer, text_encoder, vae, unet, scheduler


class ImageCaptionSet:
    """The example's dataset: each access opens the image and applies the torchvision transforms."""

    def __init__(self, folder: Path, resolution: int, tokenizer):
        from torchvision import transforms

        self.items = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg"))
        self.transform = transforms.Compose([
            transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(resolution),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ])
        self.tokenizer = tokenizer

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image

        path = self.items[i]
        with Image.open(path) as img:
            pixels = self.transform(img.convert("RGB"))
        caption = path.with_suffix(".txt").read_text().strip()
        ids = self.tokenizer(caption, max_length=self.tokenizer.model_max_length, padding="max_length",
                             truncation=True, return_tensors="pt").input_ids[0]
        return {"pixel_values": pixels, "input_ids": ids}


def trainer_noise_seeds(spec: dict, vae, unet):
    """(epoch, batch index) -> the noise seed our trainer gives that step's sample. Only for the benchmark's
    data set of one image at batch 1, where both loops see the same image every step."""
    from shared.config import config_from_dict
    from shared.images.train_data import plan_data
    from shared.reporting import Reporter
    from shared.sd.base_model import downsampling_multiple

    cfg = config_from_dict(dict(base_model=spec["model"], train_data_dir=spec["data"], output_dir="unused",
                                resolution=spec["resolution"], batch_size=spec["batch_size"], seed=spec["seed"]))
    data = plan_data(cfg, downsampling_multiple(vae, unet), Reporter())
    if len(data.items) != 1 or spec["batch_size"] != 1:
        raise ValueError("the loss-curve comparison is defined for one image at batch 1")

    def seed(epoch: int, index: int) -> int:
        return data.sample(epoch, index, 0, data.batches(epoch)[index][0]).noise_seed

    return seed


def train(spec: dict, on_step=None) -> dict:
    """Run spec["steps"] steps; `on_step(step, loss)` after each. Returns the loop's objects for
    FLOP counting (the VAE and text encoder are None when `spec["cache"]` dropped them)."""
    import gc

    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig

    folder = Path(spec["model"])
    precision = spec.get("mixed_precision", "no")
    accelerator = Accelerator(mixed_precision=precision, cpu=spec.get("device", "cpu") == "cpu")
    # the example keeps the frozen weights in the mixed-precision type and the LoRA weights in fp32
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    tokenizer, text_encoder, vae, unet, noise_scheduler = load(folder, weight_dtype)
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    device = accelerator.device
    unet.to(device)
    vae.to(device)
    text_encoder.to(device)
    unet.add_adapter(LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=spec.get("dropout", 0.0),
                                init_lora_weights="gaussian", target_modules=TARGET_MODULES))
    if spec.get("lora_init"):
        from safetensors.torch import load_file

        init = load_file(spec["lora_init"])
        params = dict(unet.named_parameters())
        if set(init) != {n for n, p in params.items() if p.requires_grad}:
            raise RuntimeError("the initial LoRA weights name other modules than the reference trains")
        with torch.no_grad():
            for name, tensor in init.items():
                params[name].copy_(tensor)
    lora_layers = [p for p in unet.parameters() if p.requires_grad]
    for p in lora_layers:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(lora_layers, lr=spec["lr"], betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    dataset = ImageCaptionSet(Path(spec["data"]), spec["resolution"], tokenizer)
    loader = torch.utils.data.DataLoader(dataset, shuffle=False, batch_size=spec["batch_size"], num_workers=0)
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=0,
                                 num_training_steps=spec["steps"])
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    noise_seeds = trainer_noise_seeds(spec, vae, unet)
    scaling = vae.config.scaling_factor

    def encode(batch):
        """The VAE's latent distribution (its mean and log-variance) and the encoder hidden states."""
        with torch.no_grad():
            pixels = batch["pixel_values"].to(device, dtype=weight_dtype)
            moments = vae.encode(pixels).latent_dist.parameters
            hidden = text_encoder(batch["input_ids"].to(device), return_dict=False)[0]
        return moments, hidden

    def step_loss(batch, epoch, index):
        # the same random numbers as our trainer draws for this step: one generator per sample, seeded
        # from its plan (latent sample, then noise, then timestep), so the loss curves can be compared
        generator = torch.Generator().manual_seed(noise_seeds(epoch, index))
        moments, encoder_hidden_states = batch if isinstance(batch, tuple) else encode(batch)
        latents = DiagonalGaussianDistribution(moments).sample(generator=generator) * scaling
        noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
        bsz = latents.shape[0]
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), generator=generator)
        timesteps = timesteps.to(device).long()
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        if noise_scheduler.config.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")

    batches = loader
    if spec.get("cache"):
        # encoded once, in loader order; the encoders are not needed again
        batches = [encode(batch) for batch in loader]
        vae = text_encoder = None
        gc.collect()
    unet.train()
    step = 0
    epoch = 0
    while step < spec["steps"]:
        for index, batch in enumerate(batches):
            loss = step_loss(batch, epoch, index)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(lora_layers, 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            step += 1
            if on_step:
                on_step(step, loss.detach().item())
            if step >= spec["steps"]:
                break
        epoch += 1
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "loader": loader, "step_loss": step_loss,
            "n_lora_modules": sum(1 for n, _ in unet.named_modules() if n.endswith("lora_A")),
            "trainable": sum(p.numel() for p in lora_layers), "time": time.perf_counter()}
