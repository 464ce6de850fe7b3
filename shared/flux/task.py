"""The Flux.1 family (dev and schnell) as a task of the training loop.

A frozen base from any layout users have (the Black Forest Labs transformer with its ae, CLIP-L and T5
files, fp8 too; ComfyUI's all-in-one checkpoint; a diffusers folder), images bucketed at multiples
of 16, the flow-matching loss on packed latents, LoRA on the chosen layers of the double and single
blocks (and CLIP-L with train_text_encoder). Memory levers, each resolved for the card when `auto`
(shared/flux/memory.py): the block weights stored in fp8, block swap, gradient checkpointing, and the
T5 + CLIP-L outputs cached so the encoders (T5-XXL is 9.5 GB) leave before the transformer takes the
card. The adapter is a kohya-named Flux LoRA (shared/flux/export.py) that ComfyUI, Forge and
diffusers load; the end adds the `.json` sidecar, a `.preview.png` and, with sample prompts, a
before/after grid.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from shared.errors import ConfigError
from shared.flux.base_model import load_flux_model
from shared.flux.block_swap import BlockSwap
from shared.flux.conditioning import FluxText, clip_pooled, encode_text, latent_params, sample_latents
from shared.flux.export import SIDECAR_SD_VERSION, flux_lora_metadata, flux_lora_tensors
from shared.flux.flow_matching import flow_matching_loss
from shared.flux.lora import clip_l_targets, inject_flux_lora, select_targets
from shared.flux.memory import plan_for
from shared.flux.sampling import PREVIEW_DEFAULTS
from shared.flux.sampling import render as render_images
from shared.flux.text_cache import TextCache, default_cache_dir, free_text_encoders
from shared.flux.tokenizers import T5_MAX_LENGTH
from shared.images.dataset import load_pixels
from shared.images.kohya_files import save_lora_file
from shared.images.latent_cache import build_latent_cache, free_vae_encoder
from shared.images.lora import inject_lora, is_lora_param
from shared.images.previews import before_after_grid, save_png
from shared.images.train_data import Sample, plan_data
from shared.images.training_metadata import common_training_metadata, legacy_model_hash, sidecar_notes
from shared.model_family import model_family
from shared.training.task import Finish, Precision, Progress, Samples, Task

TEXT_CACHE_VERSION = "flux-text-1"  # part of the text cache's fingerprint: bump when encoding changes


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def storage_dtype(precision: Precision):
    """The dtype of the frozen base: the run's weight dtype, but never fp32 on an accelerator (FLUX.1
    ships in bf16, and its fp32 copy is 48 GB)."""
    import torch

    if precision.device.type != "cpu" and precision.weight_dtype == torch.float32:
        return torch.bfloat16
    return precision.weight_dtype


def text_cache_mode(cfg) -> str:
    """disk, memory or no: flux_text_cache with `auto` resolved (disk when every step sees the same
    caption of an image)."""
    if cfg.flux_text_cache != "auto":
        return cfg.flux_text_cache
    return "disk" if not cfg.shuffle_caption and cfg.caption_dropout_rate == 0 else "no"


def file_identity(path: Path) -> list:
    """What identifies a model file (or every file of a folder) for a cache key without reading it:
    resolved name, size and modification time."""
    path = Path(path).resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


class FluxTask(Task):
    name = "flux"
    adapter_suffix = ".safetensors"

    # --- set-up ----------------------------------------------------------------------------------
    def load(self, precision: Precision) -> None:
        """Load, plan the data, cache the text outputs and free the encoders, inject LoRA, then place the
        transformer on the device (the text side goes first: T5-XXL and the transformer need not fit the
        card together)."""
        cfg = self.cfg
        self.device, self.autocast, self.dtype = precision.device, precision.autocast, storage_dtype(precision)
        family = model_family(Path(cfg.base_model), cfg.model_config, "flux")  # the header, again: no weights
        self.plan = plan_for(cfg, self.device, max_blocks=sum(family.blocks), fp8_file=family.fp8)
        if self.plan.blocks_to_swap and world_size() > 1:
            # DDP's first broadcast and gradient hooks expect every weight on the rank's device
            raise ConfigError(f"blocks_to_swap: {self.plan.blocks_to_swap} blocks to swap ({cfg.blocks_to_swap}), but "
                              "block swap runs in a single process; set num_processes: 1, or fp8_base: true and "
                              "blocks_to_swap: 0 on cards that hold the model")
        self.model = model = load_flux_model(
            cfg.base_model, ae=cfg.flux_ae, clip_l=cfg.flux_clip_l, t5xxl=cfg.flux_t5xxl, t5_tokenizer=cfg.t5_tokenizer,
            model_config=cfg.model_config, dtype=self.dtype, fp8_base=self.plan.fp8_base)
        transformer = model.transformer
        self.t5_length = cfg.t5_max_length or T5_MAX_LENGTH[model.variant]
        model.tokenizer_2.model_max_length = self.t5_length
        storage = "fp8 (float8_e4m3fn) blocks" if self.plan.fp8_base else str(self.dtype).removeprefix("torch.")
        self.reporter.log(f"Loaded FLUX.1-{model.variant} from {cfg.base_model} ({storage}; "
                          f"{len(transformer.transformer_blocks)} double + {len(transformer.single_transformer_blocks)} "
                          f"single blocks)")
        model.vae.requires_grad_(False).eval().to(self.device)
        self.data = plan_data(cfg, model.resolution_multiple, self.reporter)
        self.trained_clip = bool(cfg.train_text_encoder)
        self.text_cache = self._cache_text()
        self._inject()
        if self.plan.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        transformer.train()
        self.swap = None
        if self.plan.blocks_to_swap:
            self.swap = BlockSwap(transformer, self.plan.blocks_to_swap, device=self.device,
                                  offload_device="cpu", offload_dtype=OFFLOAD_DTYPE.get(self.device.type)).install()
        transformer.to(self.device)  # a swapped block's frozen weights stay where the swap keeps them
        self.reporter.log(f"Memory: fp8 base {'on' if self.plan.fp8_base else 'off'}, {self.plan.blocks_to_swap} blocks "
                          f"swapped, gradient checkpointing {'on' if self.plan.gradient_checkpointing else 'off'}, "
                          f"text outputs cached: {text_cache_mode(cfg)}" + (
                              f" (estimated {self.plan.estimate_gb} GB for FLUX.1-dev at 1024 px)"
                              if self.device.type == "cuda" else ""))
        base = Path(cfg.base_model)
        self.base_hash = legacy_model_hash(base) if base.is_file() else None
        self.latent_cache = None

    def _cache_text(self) -> TextCache | None:
        """Encode every caption and prompt the job will need once, then free T5 (and CLIP-L unless it
        trains): from here on no step runs them. None when captions vary (the encoders then stay)."""
        cfg, model = self.cfg, self.model
        mode = text_cache_mode(cfg)
        for encoder in (model.text_encoder, model.text_encoder_2):
            encoder.requires_grad_(False).eval().to(self.device)
        if mode == "no":
            return None
        folder = (Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()) if mode == "disk" else None
        cache = TextCache(self._text_fingerprint(), self.t5_length, folder)
        captions = sorted({self.data.fixed_caption(i) for i in range(len(self.data.items))} | set(cfg.sample_prompts or []))
        cache.fill(model, captions)
        free_text_encoders(model, ("text_encoder_2",) if self.trained_clip else ("text_encoder", "text_encoder_2"))
        self.reporter.log(f"Text cache ({mode}): {cache.hits} reused, {cache.new} encoded; T5"
                          f"{'' if self.trained_clip else ' and CLIP-L'} freed")
        return cache

    def _text_fingerprint(self) -> str:
        """The encoders' identity for the disk cache: their files (not their weights: hashing T5-XXL's
        9.5 GB would take longer than encoding), the tokenizer, the storage dtype and the T5 length."""
        sources = self.model.sources
        parts = [TEXT_CACHE_VERSION, str(self.dtype), self.t5_length,
                 *(file_identity(sources[k]) for k in ("clip_l", "t5xxl", "transformer", "t5_tokenizer")
                   if k in sources and (k != "transformer" or "t5xxl" not in sources))]
        return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()

    def _inject(self) -> None:
        cfg, model = self.cfg, self.model
        targets = select_targets(model.transformer.config, cfg.flux_lora_parts, cfg.flux_double_blocks,
                                 cfg.flux_single_blocks)
        lora = dict(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, init=cfg.lora_init,
                    init_std=cfg.lora_init_std)
        self.transformer_params = inject_flux_lora(model.transformer, targets, **lora)
        what = f"{len(targets)} transformer modules"
        self.te_params = []
        if self.trained_clip:
            te_targets = clip_l_targets(model.text_encoder)
            self.te_params = inject_lora(model.text_encoder, te_targets, **lora)
            for p in self.te_params:  # PEFT creates them in the base weight's dtype; they train in fp32
                p.data = p.data.float()
            model.text_encoder.train()
            what += f" + {len(te_targets)} CLIP-L modules"
        self.targets = targets
        self.reporter.log(f"Injected LoRA adapters with rank={cfg.lora_rank} (alpha={cfg.lora_alpha}, {what})")

    def histogram(self) -> dict[str, int]:
        return self.data.histogram()

    def param_groups(self) -> list[dict]:
        groups = [{"params": self.transformer_params, "lr": self.cfg.learning_rate}]
        if self.te_params:
            groups.append({"params": self.te_params, "lr": self.cfg.text_encoder_lr or self.cfg.learning_rate})
        return groups

    def train_modules(self) -> list:
        # CLIP-L runs outside a data-parallel wrapper (clip_pooled calls it directly); the loop averages
        # its LoRA gradients itself
        return [self.model.transformer]

    def trainable(self) -> dict:
        modules = {"transformer": self.model.transformer, **({"te": self.model.text_encoder} if self.trained_clip else {})}
        return {f"{prefix}.{n}": p for prefix, m in modules.items() for n, p in m.named_parameters() if is_lora_param(n)}

    def fingerprint(self) -> dict:
        cfg = self.cfg
        return {"flux_lora_parts": list(cfg.flux_lora_parts), "flux_double_blocks": cfg.flux_double_blocks,
                "flux_single_blocks": cfg.flux_single_blocks, "train_text_encoder": cfg.train_text_encoder,
                "images": len(self.data.items)}

    def build_caches(self) -> dict[str, bool]:
        """The latents of every image once (the text outputs were cached in `load`, before the
        transformer took the device)."""
        if self.cfg.cache_latents != "no":
            self.latent_cache = build_latent_cache(self.cfg, self.model.vae, self.data, self.device, self.reporter)
        if self.latent_cache is not None and free_vae_encoder(self.model.vae):
            import gc

            gc.collect()
            self.reporter.log("Freed the VAE encoder: the latent cache holds what it computed")
        return {"latents": self.latent_cache is not None, "text": self.text_cache is not None}

    # --- a step ----------------------------------------------------------------------------------
    def epoch_batches(self, epoch: int, size: int) -> list[list[Sample]]:
        return self.data.epoch_samples(epoch, size)

    def batch_latents(self, samples: list[Sample]):
        """(shifted and scaled latents, one generator per sample): the latent is drawn from the image's
        distribution with the sample's own generator, which then draws its noise and noise level."""
        import torch

        data = self.data
        bucket = data.plan.buckets[samples[0].index]
        if self.latent_cache is not None:
            params = []
            for s in samples:
                cached = self.latent_cache.get(self.latent_cache.key(data.items[s.index].path, bucket, s.crop, s.flip))
                if cached is None:
                    raise RuntimeError(f"latent cache miss for {data.items[s.index].path}")  # a bug, not user input
                params.append(cached)
            params = torch.stack(params)
        else:
            pixels = torch.stack([load_pixels(data.items[s.index].path, bucket, s.resized, s.crop, s.flip)
                                  for s in samples])
            params = latent_params(self.model.vae, pixels).cpu()
        generators = [torch.Generator().manual_seed(s.noise_seed) for s in samples]
        return sample_latents(self.model.vae.config, params, generators).to(self.device), generators

    def text(self, captions: list[str]) -> FluxText:
        """The conditioning of `captions` on the device: T5 from the cache (or T5 itself), CLIP-L's pooled
        output from the cache unless CLIP-L trains (then computed, with gradients when enabled)."""
        import torch

        model = self.model
        if self.text_cache is not None:
            text = self.text_cache.batch(captions, self.device, self.dtype)
            if not self.trained_clip:
                return text
            return FluxText(text.prompt_embeds, clip_pooled(model, captions, self.device).to(self.dtype), text.text_ids)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trained_clip):
            return encode_text(model, captions, max_sequence_length=self.t5_length, device=self.device).to(
                self.device, self.dtype)

    def loss(self, items: list[Sample], modules: list):
        cfg = self.cfg
        latents, generators = self.batch_latents(items)
        text = self.text([s.caption for s in items])
        with self.autocast():
            loss = flow_matching_loss(modules[0], latents, text, generators, timestep_sampling=cfg.timestep_sampling,
                                      guidance_scale=cfg.guidance_scale, scheduler=self.model.scheduler,
                                      sigmoid_scale=cfg.sigmoid_scale, logit_mean=cfg.logit_mean,
                                      logit_std=cfg.logit_std, shift=cfg.discrete_flow_shift)
        return loss * len(items), len(items)

    # --- looking at it ---------------------------------------------------------------------------
    def pictures(self, prompts: list[str], seeds: list[int] | None = None, weight: float = 1.0) -> list:
        """One PIL image per prompt at the LoRA `weight` (0: the base), at the training resolution, with
        the variant's sampling defaults (schnell 4 steps without guidance, dev 20 steps at 3.5) unless
        sample_steps / sample_guidance_scale say otherwise. Prompt i uses seeds[i] (default seed + i).
        Once the text encoders are freed, prompts must be captions or sample prompts (they were cached)."""
        cfg = self.cfg
        defaults = PREVIEW_DEFAULTS[self.model.variant]
        options = dict(size=cfg.resolution, steps=cfg.sample_steps or defaults["steps"], weight=weight,
                       guidance=defaults["guidance"] if cfg.sample_guidance_scale is None else cfg.sample_guidance_scale,
                       text_cache=_TextSource(self) if self.text_cache is not None else None)
        if seeds is None:
            return render_images(self.model, prompts, seed=cfg.seed, **options)
        return [render_images(self.model, [p], seed=s, **options)[0] for p, s in zip(prompts, seeds)]

    def sample(self, step: int, log_dir: Path) -> Samples | None:
        prompts = self.cfg.sample_prompts
        if not prompts:
            return None
        images = self.pictures(prompts)
        paths = [save_png(log_dir / "samples" / f"step{step:06d}-{i:02d}.png", image) for i, image in enumerate(images)]
        return Samples(paths=paths, prompts=list(prompts), images=images)

    # --- output ----------------------------------------------------------------------------------
    def tensors(self) -> dict:
        return flux_lora_tensors(self.model.transformer, self.model.text_encoder if self.trained_clip else None)

    def write_adapter(self, path: Path, name: str, progress: Progress, final: bool) -> None:
        cfg = self.cfg
        tensors = self.tensors()
        network_args = {"init": cfg.lora_init, "train_double_block_indices": cfg.flux_double_blocks,
                        "train_single_block_indices": cfg.flux_single_blocks, "layers": list(cfg.flux_lora_parts)}
        training = common_training_metadata(cfg, self.data, progress, tensors, self.base_hash, network_args)
        training.update({
            "ss_guidance_scale": str(cfg.guidance_scale),
            "ss_timestep_sampling": cfg.timestep_sampling,
            "ss_sigmoid_scale": str(cfg.sigmoid_scale),
            "ss_logit_mean": str(cfg.logit_mean),
            "ss_logit_std": str(cfg.logit_std),
            "ss_discrete_flow_shift": str(cfg.discrete_flow_shift),
            "ss_model_prediction_type": "raw",
            "ss_weighting_scheme": "none",
            "ss_t5xxl_max_token_length": str(self.t5_length),
            "ss_fp8_base": str(self.plan.fp8_base),
        })
        metadata = flux_lora_metadata(variant=self.model.variant, output_name=name, rank=cfg.lora_rank,
                                      alpha=cfg.lora_alpha, base_model=cfg.base_model, resolution=cfg.resolution,
                                      training=training)
        save_lora_file(path, tensors, metadata)

    def finish(self, output_dir: Path, progress: Progress) -> Finish:
        """The before/after grid (with sample prompts) and the preview, then the sidecars."""
        cfg = self.cfg
        outputs, preview = {}, None
        if cfg.sample_prompts:
            outputs["grid"] = output_dir / f"{cfg.resolved_output_name}-grid.png"
            preview = before_after_grid(lambda prompts, weight: self.pictures(prompts, weight=weight), cfg.sample_prompts,
                                        outputs["grid"], cfg.preferred_weight)
            self.reporter.log(f"Saved before/after grid {outputs['grid']}")
        elif cfg.preview:  # the card picture: a training caption at the preferred weight
            preview = self.pictures([self.data.fixed_caption(0)], weight=cfg.preferred_weight)[0]
        notes = sidecar_notes(cfg, SIDECAR_SD_VERSION, len(self.data.items))
        sidecars = {".json": lambda p, name: Path(p).write_text(json.dumps(notes, indent=2), encoding="utf-8")}
        if preview is not None and cfg.preview:
            sidecars[".preview.png"] = lambda p, name: preview.save(p, format="PNG")
        return Finish(sidecars=sidecars, outputs=outputs)

    def usage(self, published: Path) -> str:
        return (f" (use it as <lora:{published.stem}:{self.cfg.preferred_weight}> in Forge, or with a LoraLoader "
                "in ComfyUI)")


# Where a swapped block's frozen weights wait, as what: on a CUDA machine in CPU RAM, as they are. On a
# CPU-only machine there is no second memory to move them to, so nothing moves (the swap still runs
# its recompute); a test sets float64 here to prove every use of a block found its weights brought in.
OFFLOAD_DTYPE: dict = {}


class _TextSource:
    """The task's conditioning in the shape shared.flux.sampling.render takes a text cache."""

    def __init__(self, task: FluxTask):
        self.task = task

    def batch(self, captions: list[str], device=None, dtype=None) -> FluxText:
        return self.task.text(captions).to(device, dtype)
