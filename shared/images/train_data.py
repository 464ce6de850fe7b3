"""What each step of an image job (SD, Flux) trains: the items and their buckets, the per-epoch batch
order, and each sample's augmentation and noise seed, all drawn from the seed (so a resumed run and a
run on any number of processes see the same samples)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from shared.images.buckets import BucketPlan, assign_buckets, epoch_batches
from shared.images.dataset import image_size, plan_crop, process_caption, scan_dataset
from shared.images.regularisation import add_regularisation, loss_weights
from shared.images.validation_split import split_validation
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
        self.reg_metadata: dict[str, str] = {}  # kohya's header keys of the regularisation images
        self.validation: TrainData | None = None  # the held-out images (shared/sd/validation.py)

    @property
    def training_items(self) -> list:
        """The user's own images (without the regularisation images)."""
        return [item for item in self.items if not item.is_reg]

    def loss_weights(self, samples: list[Sample]) -> list[float] | None:
        """Each sample's loss weight: prior_loss_weight for a regularisation image (None: all 1)."""
        return loss_weights(self.items, [s.index for s in samples], self.cfg.prior_loss_weight)

    def batches(self, epoch: int, size: int | None = None) -> list[list[int]]:
        """The epoch's batches of item indices (`size` items each; default batch_size x processes)."""
        size = size or self.cfg.batch_size * self.processes
        return epoch_batches(self.plan.buckets, self.repeats, size, self.cfg.seed, epoch)

    def shard(self, samples: list[Sample]) -> tuple[list[Sample], float]:
        """This rank's part of a global batch and the weight on its mean loss (shared.training.ranks)."""
        return shard(samples, self.rank, self.processes, self.cfg.batch_size)

    def trigger_word(self, index: int) -> str | None:
        """The trigger word for an item's caption: none for a regularisation image (it shows the class as the
        base model knows it, which is what it must keep meaning)."""
        return None if self.items[index].is_reg else self.cfg.trigger_word

    def fixed_caption(self, index: int) -> str:
        """An item's caption as it reads without augmentation (text caches, previews, validation)."""
        return process_caption(self.items[index].caption, trigger_word=self.trigger_word(index), shuffle=False,
                               keep_tokens=0, dropout_rate=0.0, rng=random.Random(0))

    def fixed_sample(self, index: int, noise_seed: int) -> Sample:
        """An item as a Sample without augmentation: centre crop, unflipped, its fixed caption."""
        resized, crop = plan_crop(self.sizes[index], self.plan.buckets[index], random_crop=False, rng=None)
        return Sample(index, self.fixed_caption(index), False, resized, crop, noise_seed=noise_seed)

    def sample(self, epoch: int, batch: int, slot: int, index: int) -> Sample:
        cfg = self.cfg
        rng = random.Random(f"{cfg.seed}-{epoch}-{batch}-{slot}")
        caption = process_caption(self.items[index].caption, trigger_word=self.trigger_word(index),
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
    """Scan the data set (and the regularisation and validation images) and put each image in a bucket
    whose sides are multiples of `multiple`: what the model's own downsampling allows (SD: VAE x UNet;
    Flux: VAE x the 2x2 packing)."""
    scan = scan_dataset(cfg.train_data_dir, cfg.metadata_path, cfg.caption_extension)
    reporter.log(scan.summary())
    items, held_out = split_validation(cfg, scan.items, reporter)
    reg = add_regularisation(cfg, items, reporter)
    bucketing = _bucketing(cfg, multiple)
    sizes = [image_size(item.path) for item in items + reg.items]
    plan = bucketing(sizes)
    data = TrainData(cfg, items + reg.items, plan, sizes, processes, rank)
    data.reg_metadata = reg.metadata
    if held_out:
        held_sizes = [image_size(item.path) for item in held_out]
        data.validation = TrainData(cfg, held_out, bucketing(held_sizes), held_sizes)
    reporter.log(f"Buckets: {plan.summary(data.repeats)}")
    return data


def _bucketing(cfg, multiple: int):
    """sizes -> BucketPlan with sides the model allows (the resolution itself was checked against the same
    multiple, read from the checkpoint's header, by the pre-flight)."""
    need = multiple
    step = math.ceil(cfg.bucket_reso_steps / need) * need
    min_size = max(step, min(cfg.min_bucket_reso, cfg.resolution // 2) // step * step)
    max_size = max(cfg.max_bucket_reso, cfg.resolution)
    return lambda sizes: assign_buckets(sizes, resolution=cfg.resolution, step=step, min_size=min_size,
                                        max_size=max_size, enabled=cfg.enable_bucket, upscale=cfg.bucket_upscale)
