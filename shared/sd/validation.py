"""The validation loss of an SD job: held-out images scored at fixed timesteps and fixed noise, so the value
moves only when the weights do and checkpoints can be compared (the `eval_loss` of the `checkpoint`
event, eval/loss in TensorBoard).

- The set (shared/images/validation_split.py): `validation_split` of the training images (chosen with `validation_seed`, default `seed`; at
  least one image; regularisation images are never held out) or the images of `validation_dir`. Each image
  once (repeats ignored), at its bucket, centre crop, unflipped, with its caption as it reads without
  augmentation (trigger word first, no shuffle, no dropout).
- The score: at `validation_timesteps` evenly spaced timesteps (4: 200, 400, 600, 800 of 1000, the ones
  kohya's validation uses), the mean squared error of the UNet's noise (or v) prediction. Where kohya
  reseeds the global generator before each validation, each image here has its own generators, seeded by
  (validation seed, image) for the latent drawn from the VAE's distribution and by (that, timestep) for the
  noise: the numbers do not depend on the batch an image lands in, and the global generator is not
  touched. No offset noise and no min-SNR weighting: the plain error, comparable across configs.
- It runs in eval mode (no LoRA dropout) under no_grad, inside `torch.random.fork_rng` as well, so a run
  with validation trains exactly the steps of one without.
- Through the latent and text caches where the job has them: their entries are made with the training
  images' (shared/sd/caching.py, SDTask.build_caches).
"""

from __future__ import annotations

import contextlib
import random

from shared.images.validation_split import validation_seed


def fixed_timesteps(num_train_timesteps: int, count: int) -> list[int]:
    """`count` timesteps evenly spaced inside (0, num_train_timesteps), both ends left out."""
    return [num_train_timesteps * (k + 1) // (count + 1) for k in range(count)]


def validation_batches(data, batch_size: int, seed: int) -> list[list]:
    """The held-out images as Samples without augmentation, batched by bucket, in a fixed order."""
    by_bucket: dict[tuple[int, int], list] = {}
    for index in range(len(data.items)):
        noise_seed = random.Random(f"{seed}-validation-{index}").getrandbits(63)
        by_bucket.setdefault(data.plan.buckets[index], []).append(data.fixed_sample(index, noise_seed))
    return [samples[i : i + batch_size] for _, samples in sorted(by_bucket.items())
            for i in range(0, len(samples), batch_size)]


@contextlib.contextmanager
def _scoring(modules: list):
    """Eval mode, no gradients and the global random state put back afterwards."""
    import torch

    training = [m.training for m in modules]
    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            for m in modules:
                m.eval()
            yield
    finally:
        for m, was in zip(modules, training):
            m.train(was)


def validation_loss(task, data) -> float:
    """The mean loss of the held-out `data` (a TrainData) under the task's current weights."""
    import torch

    from shared.sd.loss import noise_losses

    cfg, model = task.cfg, task.model
    seed = validation_seed(cfg)
    timesteps = fixed_timesteps(model.noise_scheduler.config.num_train_timesteps, cfg.validation_timesteps)
    total, count = 0.0, 0
    with _scoring([model.unet, *task.trained_encoders]):
        for batch in validation_batches(data, cfg.batch_size, seed):
            latents, ehs, extra, _, _ = task.batch_inputs(batch, data)  # unmasked: the plain loss
            for t in timesteps:
                generators = [torch.Generator().manual_seed(random.Random(f"{s.noise_seed}-{t}").getrandbits(63))
                              for s in batch]
                fixed = torch.full((len(batch),), t, dtype=torch.long, device=latents.device)
                with task.autocast():
                    losses = noise_losses(model, latents, ehs, generators, unet_extra=extra, timesteps=fixed)
                total += losses.sum().item()
                count += len(batch)
    return total / count
