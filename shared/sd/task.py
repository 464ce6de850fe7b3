"""The SD family as a task of the training loop (SD1.x, SD2.x epsilon/v, SDXL).

Frozen base, LoRA (LoCon, DoRA) or LoHa / LoKr (lycoris-lora) on the UNet and optionally the text
encoders, with per-block ranks and learning rates; images bucketed by aspect ratio; the noise (or v)
loss with offset noise, min-SNR and per-pixel masks; latent and text-encoder caches. The adapter is a
kohya-layout `.safetensors` (LyCORIS keys for LoHa / LoKr) with its metadata; the end adds the `.json`
sidecar, a `.preview.png` (unless `preview: false`) and, with sample prompts, a before/after grid.
"""

from __future__ import annotations

from pathlib import Path

from shared.images.dataset import load_pixels, tokenize
from shared.images.latent_cache import build_latent_cache, free_vae_encoder
from shared.images.lora import (
    inject_lora,
    is_lora_param,
    kohya_conv_targets,
    kohya_text_encoder_targets,
    kohya_unet_targets,
)
from shared.images.train_data import Sample, TrainData, plan_data
from shared.images.training_metadata import legacy_model_hash
from shared.sd.base_model import load_sd_model
from shared.sd.blocks import (
    block_network_args,
    block_param_groups,
    configured_lr_weights,
    configured_module_ranks,
)
from shared.sd.caching import build_text_cache
from shared.sd.conditioning import encode_text, sdxl_time_ids, unet_kwargs
from shared.sd.export import sidecar_json, training_metadata
from shared.sd.kohya_export import model_lora_tensors, save_lora_file
from shared.sd.loss import noise_losses
from shared.sd.lycoris import LycorisSpec, inject_sd, lycoris_metadata, model_lycoris_tensors
from shared.sd.masks import batch_masks, load_mask
from shared.sd.sampling import (
    before_after_grid,
    evaluation_images,
    evaluation_prompts,
    preview_image,
    render_samples,
)
from shared.sd.validation import validation_loss
from shared.training.task import Evaluation, Finish, Precision, Progress, Samples, Task


class SDTask(Task):
    name = "sd"
    adapter_suffix = ".safetensors"
    # a bucket's batches have one shape, so glibc's heap reuses its blocks; a fixed mmap threshold made
    # every step fault its activations in afresh: SD1.5 at 256 px, bf16, 2.3 -> 3.5 s per forward and
    # backward for a 4% lower peak (120 MiB of 2.8 GB)
    lean_allocator = False

    # --- set-up ----------------------------------------------------------------------------------
    def memory_model(self, precision: Precision):
        from shared.images.dataset import scan_dataset
        from shared.sd.memory import sd_memory_model

        cfg = self.cfg
        items = scan_dataset(cfg.train_data_dir, cfg.metadata_path, cfg.caption_extension).items
        captions = len({item.caption for item in items}) + len(cfg.sample_prompts or []) + 1  # + "" (negative)
        return sd_memory_model(cfg, precision, images=len(items), captions=captions)

    def load(self, precision: Precision) -> None:
        cfg = self.cfg
        self.device, self.weight_dtype, self.autocast = precision.device, precision.weight_dtype, precision.autocast
        self.model = model = load_sd_model(cfg.base_model, cfg.model_config, cfg.prediction_type, self.weight_dtype)
        self.reporter.log(f"Loaded base model from {cfg.base_model} ({model.arch}, {model.prediction_type}, "
                          f"stored in {str(self.weight_dtype).removeprefix('torch.')})")
        for module in (model.vae, *model.text_encoders, model.unet):  # already in their storage types
            module.requires_grad_(False).eval().to(self.device)
        if cfg.channels_last == "yes":
            # the frozen base only: the adapter's own convolutions (LoCon) keep the contiguous layout
            # the saved files and states need; a convolution takes its output layout from either input
            import torch

            model.unet.to(memory_format=torch.channels_last)
            self.reporter.log("UNet convolutions on channels-last tensors (channels_last: yes)")
        self.data = plan_data(cfg, model.resolution_multiple, self.reporter)
        self._inject()
        base = Path(cfg.base_model)
        self.base_hash = legacy_model_hash(base) if base.is_file() else None
        self.latent_cache = self.text_cache = None

    def _inject(self) -> None:
        cfg, model = self.cfg, self.model
        targets = kohya_unet_targets(model.unet)
        conv = kohya_conv_targets(model.unet) if cfg.conv_rank else []
        ranks = configured_module_ranks(cfg, model.unet, targets, conv)  # block_dims; None: one rank everywhere
        self.block_weights = configured_lr_weights(cfg, model.unet.config)  # checked now, used by param_groups
        what = f"{len(targets)} UNet modules" + (f" + {len(conv)} LoCon modules" if conv else "")
        self.te_params = []
        if cfg.train_text_encoder:
            what += "".join(f" + {len(kohya_text_encoder_targets(e))} text-encoder modules" for e in model.text_encoders)
        self.spec = None
        if cfg.lora_type != "lora":
            self.spec = LycorisSpec(cfg.lora_type, cfg.lora_rank, cfg.lora_alpha, conv_rank=cfg.conv_rank,
                                    conv_alpha=cfg.conv_alpha, factor=cfg.lycoris_factor,
                                    decompose_both=cfg.lycoris_decompose_both, use_tucker=cfg.lycoris_use_tucker,
                                    rank_dropout=cfg.lycoris_rank_dropout, module_dropout=cfg.lycoris_module_dropout)
            params = inject_sd(model.unet, model.text_encoders, model.arch, self.spec, conv=bool(conv),
                               train_text_encoder=cfg.train_text_encoder, module_ranks=ranks)
            unet_ids = {id(p) for p in model.unet.parameters()}
            self.unet_params = [p for p in params if id(p) in unet_ids]
            self.te_params = [p for p in params if id(p) not in unet_ids]
            if cfg.lora_dropout:
                self.reporter.log(f"lora_dropout does not apply to {cfg.lora_type} (lycoris_rank_dropout and "
                                  "lycoris_module_dropout do)")
        else:
            lora_args = dict(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, init=cfg.lora_init,
                             init_std=cfg.lora_init_std, dora=cfg.use_dora)
            self.unet_params = inject_lora(model.unet, targets, conv_targets=conv, conv_rank=cfg.conv_rank,
                                           conv_alpha=cfg.conv_alpha, module_ranks=ranks, **lora_args)
            for encoder in model.text_encoders if cfg.train_text_encoder else []:
                self.te_params += inject_lora(encoder, kohya_text_encoder_targets(encoder), **lora_args)
        for encoder in model.text_encoders if cfg.train_text_encoder else []:
            encoder.train()
        for p in self.unet_params + self.te_params:  # adapter weights train in fp32 under autocast
            p.data = p.data.float()
        kind = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr"}[cfg.lora_type]
        self.reporter.log(f"Injected {kind} adapters with rank={cfg.lora_rank} (alpha={cfg.lora_alpha}, {what}"
                          + (", ranks per block" if ranks else "") + ")")
        if cfg.gradient_checkpointing:
            model.unet.enable_gradient_checkpointing()
        model.unet.train()
        self.trained_encoders = list(model.text_encoders) if cfg.train_text_encoder else []

    def histogram(self) -> dict[str, int]:
        return self.data.histogram()

    def param_groups(self) -> list[dict]:
        if self.block_weights is not None:  # one group per UNet block at lr x its factor (0: frozen, left out)
            groups = block_param_groups(self.model.unet, self.cfg.learning_rate, self.block_weights)
        else:
            groups = [{"params": self.unet_params, "lr": self.cfg.learning_rate}]
        if self.te_params:
            groups.append({"params": self.te_params, "lr": self.cfg.text_encoder_lr or self.cfg.learning_rate})
        return groups

    def train_modules(self) -> list:
        # the text encoders run outside a data-parallel wrapper (encode_text calls them directly);
        # the loop averages their LoRA gradients itself
        return [self.model.unet]

    def trainable(self) -> dict:
        modules = {"unet": self.model.unet, **{f"te{i}": e for i, e in enumerate(self.trained_encoders)}}
        return {f"{prefix}.{n}": p for prefix, m in modules.items() for n, p in m.named_parameters()
                if is_lora_param(n)}

    def fingerprint(self) -> dict:
        cfg = self.cfg
        return {"conv_rank": cfg.conv_rank, "train_text_encoder": cfg.train_text_encoder,
                "images": len(self.data.items), "lora_type": cfg.lora_type, "optimizer": cfg.optimizer}

    def build_caches(self) -> dict[str, bool]:
        """Encode every image (and caption) once when asked; afterwards no step runs the VAE (or the
        text encoders)."""
        cfg = self.cfg
        held_out = self.data.validation
        if cfg.cache_latents != "no":
            self.latent_cache = build_latent_cache(cfg, self.model.vae, self.data, self.device, self.reporter,
                                                   held_out)
        if cfg.cache_text_encoder_outputs == "yes":
            prompts = [*(cfg.sample_prompts or []), ""]  # "": the negative prompt of every render
            prompts += [held_out.fixed_caption(i) for i in range(len(held_out.items))] if held_out else []
            prompts += self.eval_prompts() if cfg.evaluation else []  # the evaluation's pictures (shared/evaluation)
            self.text_cache = build_text_cache(self.model, self.data, self.device, self.reporter, prompts)
        self._free_cached_encoders()
        return {"latents": self.latent_cache is not None, "text": self.text_cache is not None}

    def _free_cached_encoders(self) -> None:
        """What a cache replaced leaves memory (not only the device): the VAE's encoder half (renders
        only decode) and the text encoders (every prompt a render uses is in the text cache)."""
        import gc

        freed = []
        if self.latent_cache is not None and free_vae_encoder(self.model.vae):
            freed.append("the VAE encoder")
        if self.text_cache is not None and self.model.text_encoders:
            self.model.text_encoders = []
            freed.append("the text encoders")
        if freed:
            gc.collect()
            self.reporter.log(f"Freed {' and '.join(freed)}: the caches hold what they computed")

    # --- a step ----------------------------------------------------------------------------------
    def epoch_batches(self, epoch: int, size: int) -> list[list[Sample]]:
        return self.data.epoch_samples(epoch, size)

    def batch_inputs(self, samples: list[Sample], data: TrainData | None = None):
        """(latents, text conditioning, SDXL's extra UNet inputs, one generator per sample, the latent
        mask or None) of samples of `data` (default: the training data; the validation set passes its own)."""
        import torch
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        model, data = self.model, data or self.data
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
        generators = [torch.Generator().manual_seed(s.noise_seed) for s in samples]
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
        mask = None
        if self.cfg.masked_loss:  # masks follow their image's resize, crop and flip; not the VAE: cached or not
            masks = [load_mask(data.items[s.index].path, bucket, s.resized, s.crop, s.flip, mask_dir=self.cfg.mask_dir,
                               from_alpha=self.cfg.mask_from_alpha) for s in samples]
            mask = batch_masks(masks, tuple(latents.shape[2:]), self.device)
        return latents.to(self.weight_dtype), ehs.to(self.weight_dtype), extra, generators, mask

    def loss(self, items: list[Sample], modules: list):
        import torch

        cfg = self.cfg
        latents, ehs, extra, generators, mask = self.batch_inputs(items)
        with self.autocast():
            losses = noise_losses(self.model, latents, ehs, generators, noise_offset=cfg.noise_offset,
                                  min_snr_gamma=cfg.min_snr_gamma, unet_extra=extra, unet=modules[0], mask=mask,
                                  unmasked_weight=cfg.unmasked_weight, normalize_mask=cfg.normalize_masked_area_loss)
        weights = self.data.loss_weights(items)  # regularisation images: prior_loss_weight
        if weights is not None:
            losses = losses * torch.tensor(weights, dtype=losses.dtype, device=losses.device)
        return losses.sum(), len(items)

    # --- looking at it ---------------------------------------------------------------------------
    def evaluate(self, step: int, log_dir: Path) -> Evaluation:
        """The validation loss (shared/sd/validation.py) when the job has a validation set."""
        if self.data.validation is None:
            return Evaluation()
        loss = validation_loss(self, self.data.validation)
        self.reporter.log(f"Validation loss at step {step}: {loss:.6f} ({len(self.data.validation.items)} images)")
        return Evaluation(metrics={"eval_loss": loss})

    def sample(self, step: int, log_dir: Path) -> Samples | None:
        if not self.cfg.sample_prompts:
            return None
        return render_samples(self.model, self.cfg, self.device, step, log_dir / "samples", self.text_cache)

    def eval_prompts(self) -> list[str]:
        return super().eval_prompts() or evaluation_prompts(self.data, self.cfg.eval_prompt_count)

    def render(self, prompts: list[str], seeds: list[int], weight: float) -> list:
        return evaluation_images(self.model, self.cfg, self.device, prompts, seeds, weight, self.text_cache)

    def data_summary(self) -> dict:
        data = self.data
        return {"images": len(data.items), "repeats": sum(data.repeats),
                "captions": [data.fixed_caption(i) for i in range(min(len(data.items), 5))]}

    # --- output ----------------------------------------------------------------------------------
    def tensors(self) -> dict:
        if self.spec is not None:
            return model_lycoris_tensors(self.model.arch, self.model.unet, self.trained_encoders)
        return model_lora_tensors(self.model.arch, self.model.unet, self.trained_encoders)

    def write_adapter(self, path: Path, name: str, progress: Progress, final: bool) -> None:
        import json

        tensors = self.tensors()
        metadata = training_metadata(self.cfg, self.model, self.data, progress, tensors, name, self.base_hash)
        if self.spec is not None:  # ss_network_module / _args / _dim / _alpha as kohya writes a LyCORIS network
            metadata.update(lycoris_metadata(self.spec))
        blocks = block_network_args(self.cfg)
        if blocks:
            metadata["ss_network_args"] = json.dumps({**json.loads(metadata["ss_network_args"]), **blocks})
        save_lora_file(path, tensors, metadata)

    def finish(self, output_dir: Path, progress: Progress) -> Finish:
        """The before/after grid (with sample prompts) and the preview, then the sidecars."""
        import json

        cfg = self.cfg
        outputs, preview = {}, None
        if cfg.sample_prompts:
            outputs["grid"] = output_dir / f"{cfg.resolved_output_name}-grid.png"
            preview = before_after_grid(self.model, cfg, self.device, outputs["grid"], self.text_cache)
            self.reporter.log(f"Saved before/after grid {outputs['grid']}")
        elif cfg.preview:  # the card picture: a training caption at the preferred weight
            preview = preview_image(self.model, cfg, self.device, self.data.fixed_caption(0), self.text_cache)
        notes = sidecar_json(cfg, self.model.arch, len(self.data.training_items))
        sidecars = {".json": lambda p, name: Path(p).write_text(json.dumps(notes, indent=2), encoding="utf-8")}
        if preview is not None and cfg.preview:
            sidecars[".preview.png"] = lambda p, name: preview.save(p, format="PNG")
        return Finish(sidecars=sidecars, outputs=outputs)

    def usage(self, published: Path) -> str:
        return f" (use it as <lora:{published.stem}:{self.cfg.preferred_weight}>)"
