"""Aspect-ratio bucketing: train each image at a size near its own shape instead of a square crop.

Buckets are (width, height) pairs, multiples of `step`, with an area of at most resolution².
An image goes to the bucket whose aspect ratio is nearest its own. Without `upscale`, an image
smaller than that area keeps its own size (rounded down to `step`) so it is never enlarged.
Batches hold images of one bucket only; the epoch's order comes from (seed, epoch), so a resumed
run sees the same batches in the same order.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import dataclass


def make_buckets(resolution: int, step: int, min_size: int, max_size: int) -> list[tuple[int, int]]:
    area = resolution * resolution
    out = {(resolution // step * step, resolution // step * step)}
    for width in range(min_size, max_size + 1, step):
        height = min(max_size, area // width // step * step)
        if height >= min_size:
            out.add((width, height))
            out.add((height, width))
    return sorted(out)


@dataclass
class BucketPlan:
    buckets: list[tuple[int, int]]  # per item (width, height)
    ar_errors: list[float]

    def histogram(self, repeats: list[int]) -> Counter:
        counts: Counter = Counter()
        for bucket, n in zip(self.buckets, repeats):
            counts[bucket] += n
        return counts

    def summary(self, repeats: list[int]) -> str:
        hist = self.histogram(repeats)
        parts = [f"{w}x{h}: {n}" for (w, h), n in sorted(hist.items())]
        return f"{len(hist)} buckets ({', '.join(parts)})"

    def ss_bucket_info(self, repeats: list[int]) -> str:
        """kohya's `ss_bucket_info` JSON: bucket index -> resolution and image count."""
        hist = sorted(self.histogram(repeats).items())
        mean_error = sum(self.ar_errors) / len(self.ar_errors) if self.ar_errors else 0.0
        return json.dumps({
            "buckets": {str(i): {"resolution": list(res), "count": n} for i, (res, n) in enumerate(hist)},
            "mean_img_ar_error": mean_error,
        })


def assign_buckets(sizes: list[tuple[int, int]], *, resolution: int, step: int, min_size: int, max_size: int,
                   enabled: bool = True, upscale: bool = False) -> BucketPlan:
    """One bucket per image size (width, height)."""
    square = resolution // step * step
    if not enabled:
        return BucketPlan([(square, square)] * len(sizes), [abs(math.log(w / h)) for w, h in sizes])
    candidates = make_buckets(resolution, step, min_size, max_size)
    area = resolution * resolution
    out, errors = [], []
    for w, h in sizes:
        if not upscale and w * h <= area:
            bucket = (max(step, w // step * step), max(step, h // step * step))
        else:
            ar = math.log(w / h)
            bucket = min(candidates, key=lambda b: (abs(math.log(b[0] / b[1]) - ar), -b[0] * b[1]))
        out.append(bucket)
        errors.append(abs(bucket[0] / bucket[1] - w / h))
    return BucketPlan(out, errors)


def epoch_batches(buckets: list[tuple[int, int]], repeats: list[int], batch_size: int, seed: int,
                  epoch: int) -> list[list[int]]:
    """The item indices of every batch of one epoch, in order. Same seed and epoch, same list."""
    rng = random.Random(f"{seed}-{epoch}")
    groups: dict[tuple[int, int], list[int]] = {}
    for index, (bucket, n) in enumerate(zip(buckets, repeats)):
        groups.setdefault(bucket, []).extend([index] * n)
    batches = []
    for bucket in sorted(groups):
        members = groups[bucket]
        rng.shuffle(members)
        batches.extend(members[i : i + batch_size] for i in range(0, len(members), batch_size))
    rng.shuffle(batches)
    return batches
