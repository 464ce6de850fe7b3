"""What each step of an image job (SD, Flux) trains: the items and their buckets, the per-epoch batch
order, and each sample's augmentation and noise seed, all drawn from the seed (so a resumed run and a
run on any number of processes see the same samples)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from shared.images.buckets import BucketPlan, assign_buckets, epoch_batches
from shared.images.dataset import image_size, plan_crop, process_caption, scan_dataset
from shared.training.ranks import shard


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

    A batch is a global one (batch_size x processes images): every rank plans the same batches and
    trains its own slice of each (`shard`), so all ranks take the same number of steps and together
    see what one process with the whole batch would."""

    def __init__(self, cfg, items, plan: BucketPlan, sizes, processes: int = 1, rank: int = 0):
        self.cfg = cfg
        self.items = items
        self.plan = plan
        self.sizes = sizes
        self.repeats = [item.repeats for item in items]
        self.processes, self.rank = processes, rank

    def batches(self, epoch: int, size: int | None = None) -> list[list[int]]:
        """The epoch's batches of item indices (`size` items each; default batch_size x processes)."""
        size = size or self.cfg.batch_size * self.processes
        return epoch_batches(self.plan.buckets, self.repeats, size, self.cfg.seed, epoch)

    def shard(self, samples: list[Sample]) -> tuple[list[Sample], float]:
        """This rank's part of a global batch and the weight on its mean loss (shared.training.ranks)."""
        return shard(samples, self.rank, self.processes, self.cfg.batch_size)

    def fixed_caption(self, index: int) -> str:
        """An item's caption as it reads without augmentation (text caches, previews)."""
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

    def epoch_samples(self, epoch: int, size: int) -> list[list[Sample]]:
        """The epoch's batches as the samples they train."""
        return [[self.sample(epoch, b, slot, index) for slot, index in enumerate(batch)]
                for b, batch in enumerate(self.batches(epoch, size))]

    def histogram(self) -> dict[str, int]:
        return {f"{w}x{h}": n for (w, h), n in sorted(self.plan.histogram(self.repeats).items())}


def plan_data(cfg, multiple: int, reporter, processes: int = 1, rank: int = 0) -> TrainData:
    """Scan the data set and put each image in a bucket whose sides are multiples of `multiple`: what
    the model's own downsampling allows (SD: VAE x UNet; Flux: VAE x the 2x2 packing). The resolution
    itself was checked against the same multiple, read from the checkpoint's header, by the pre-flight."""
    scan = scan_dataset(cfg.train_data_dir, cfg.metadata_path, cfg.caption_extension)
    reporter.log(scan.summary())
    need = multiple
    step = math.ceil(cfg.bucket_reso_steps / need) * need
    min_size = max(step, min(cfg.min_bucket_reso, cfg.resolution // 2) // step * step)
    max_size = max(cfg.max_bucket_reso, cfg.resolution)
    sizes = [image_size(item.path) for item in scan.items]
    plan = assign_buckets(sizes, resolution=cfg.resolution, step=step, min_size=min_size, max_size=max_size,
                          enabled=cfg.enable_bucket, upscale=cfg.bucket_upscale)
    data = TrainData(cfg, scan.items, plan, sizes, processes, rank)
    reporter.log(f"Buckets: {plan.summary(data.repeats)}")
    return data
