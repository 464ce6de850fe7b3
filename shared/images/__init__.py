"""What the image families (SD, Flux) share: image data sets, buckets and per-step samples, the latent
cache, PEFT LoRA on named modules (and DoRA), kohya LoRA files with their metadata and sidecar,
checkpoint reading, the CLIP tokenizer, previews and the before/after grid. Never imports a family."""
