"""Stable Diffusion side of the trainer: base models, data, LoRA, training loop, kohya export."""
