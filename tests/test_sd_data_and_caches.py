"""Bucketing, repeat folders, caption handling, and the latent / text-encoder caches."""

import random

import pytest
from PIL import Image

from shared.images.buckets import assign_buckets, epoch_batches
from shared.images.dataset import process_caption, scan_dataset
from shared.preflight import load_config
from shared.reporting import Reporter
from shared.train import run_training


def test_landscape_and_portrait_land_in_different_buckets_and_none_is_lost():
    sizes = [(96, 64), (64, 96), (64, 64), (960, 640), (640, 960)]  # 3:2, 2:3, square, big 3:2, big 2:3
    plan = assign_buckets(sizes, resolution=64, step=16, min_size=32, max_size=128, upscale=False)
    landscape, portrait, square, big_landscape, big_portrait = plan.buckets
    assert landscape[0] > landscape[1] and portrait[0] < portrait[1]
    assert landscape == (portrait[1], portrait[0]) and square == (64, 64)
    assert big_landscape == landscape and big_portrait == portrait
    assert all(w * h <= 64 * 64 and w % 16 == 0 and h % 16 == 0 for w, h in plan.buckets)
    assert sum(plan.histogram([1] * 5).values()) == 5
    batches = epoch_batches(plan.buckets, [1, 1, 1, 2, 1], batch_size=2, seed=0, epoch=0)
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3, 3, 4]  # repeats counted, nothing lost
    assert all(len({plan.buckets[i] for i in b}) == 1 for b in batches)  # one bucket per batch
    assert batches == epoch_batches(plan.buckets, [1, 1, 1, 2, 1], batch_size=2, seed=0, epoch=0)


def test_small_images_are_not_upscaled_unless_asked():
    small = [(32, 48)]
    assert assign_buckets(small, resolution=64, step=16, min_size=16, max_size=128).buckets == [(32, 48)]
    up = assign_buckets(small, resolution=64, step=16, min_size=16, max_size=128, upscale=True).buckets[0]
    assert up[0] * up[1] > 32 * 48 and up[0] < up[1]


def test_repeat_folders_and_caption_extension(tmp_path):
    from shared.fixtures.images import make_image_folder

    make_image_folder(tmp_path / "data" / "10_shapes", count=3, captions="txt")
    make_image_folder(tmp_path / "data" / "2_more", count=2, captions="none")
    for p in (tmp_path / "data" / "2_more").glob("*.png"):
        p.with_suffix(".caption").write_text("other caption")
    scan = scan_dataset(tmp_path / "data", caption_extension=".caption")
    by_subset = {(i.subset, i.repeats) for i in scan.items}
    assert by_subset == {("10_shapes", 10), ("2_more", 2)}
    assert [i.caption for i in scan.items if i.subset == "2_more"] == ["other caption"] * 2
    assert all(i.caption == "" for i in scan.items if i.subset == "10_shapes")  # .txt ignored here


def test_caption_trigger_word_shuffle_keep_tokens_and_dropout():
    caption = "a photo, red, round, shiny, small"
    seen = set()
    for seed in range(30):
        out = process_caption(caption, trigger_word="sks", shuffle=True, keep_tokens=2, dropout_rate=0.0,
                              rng=random.Random(seed))
        tags = out.split(", ")
        assert tags[:2] == ["sks", "a photo"] and sorted(tags[2:]) == ["red", "round", "shiny", "small"]
        seen.add(out)
    assert len(seen) > 5  # it does shuffle
    dropped = [process_caption(caption, trigger_word=None, shuffle=False, keep_tokens=0, dropout_rate=0.5,
                               rng=random.Random(s)) for s in range(200)]
    assert 60 < dropped.count("") < 140


class _Spy(Reporter):
    """Once the caches are built, make any VAE encode or text-encoder forward fail loudly."""

    def __init__(self, monkeypatch, text=True):
        self.monkeypatch = monkeypatch
        self.text = text
        self.lines = []
        self.buckets = None

    def log(self, message):
        self.lines.append(message)

    def event(self, kind, **data):
        if kind == "buckets":
            self.buckets = data["histogram"]
        if kind == "cached":
            from diffusers import AutoencoderKL
            from transformers import CLIPTextModel

            def forbidden(*args, **kwargs):
                raise AssertionError("a VAE/text-encoder forward ran during training steps")

            self.monkeypatch.setattr(AutoencoderKL, "encode", forbidden)
            if self.text:
                self.monkeypatch.setattr(CLIPTextModel, "forward", forbidden)


@pytest.fixture
def mixed_images(tmp_path):
    """Square, 3:2 and 2:3 images with .txt captions."""
    from shared.fixtures.images import draw_shape

    folder = tmp_path / "mixed"
    folder.mkdir()
    rng = random.Random(0)
    for i, size in enumerate([(64, 64), (96, 64), (64, 96), (64, 64), (96, 64), (64, 96)]):
        draw_shape(["circle", "square", "triangle"][i % 3], "red", "white", size, rng).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"shape {i}, flat style")
    return folder


def test_caches_are_used_and_give_the_same_losses(sd_config, mixed_images, tmp_path, monkeypatch):
    common = dict(train_data_dir=mixed_images, bucket_reso_steps=16, random_flip=True, max_train_steps=4,
                  lora_dropout=0.0)
    plain = run_training(load_config(sd_config(**common)))

    spy = _Spy(monkeypatch)
    cached_cfg = sd_config(**common, cache_latents="disk", cache_dir=tmp_path / "cache",
                           cache_text_encoder_outputs=True, output_dir=tmp_path / "out2" / "c")
    cached = run_training(load_config(cached_cfg), spy)
    monkeypatch.undo()
    assert cached.steps == plain.steps == 4
    assert cached.losses == pytest.approx(plain.losses, rel=1e-4)  # same seed, same loss, cached or not
    assert any("Latent cache (disk): 0 reused, 12 encoded" in line for line in spy.lines)  # 6 images x 2 flips
    assert sum(spy.buckets.values()) == 6 and len(spy.buckets) == 3  # square, 3:2, 2:3; nothing lost

    # a second run reuses the disk cache: no image is encoded again
    again = _Spy(monkeypatch, text=False)
    run_training(load_config(sd_config(**common, cache_latents="disk", cache_dir=tmp_path / "cache",
                                       output_dir=tmp_path / "out3" / "c")), again)
    monkeypatch.undo()
    assert any("Latent cache (disk): 12 reused, 0 encoded" in line for line in again.lines)

    # a changed image is encoded afresh, never served from the cache
    Image.new("RGB", (64, 64), "blue").save(mixed_images / "0.png")
    changed = _Spy(monkeypatch, text=False)
    run_training(load_config(sd_config(**common, cache_latents="disk", cache_dir=tmp_path / "cache",
                                       output_dir=tmp_path / "out4" / "c")), changed)
    monkeypatch.undo()
    assert any("Latent cache (disk): 10 reused, 2 encoded" in line for line in changed.lines)


def test_text_encoder_cache_needs_fixed_captions(sd_config):
    from shared.errors import ConfigError

    with pytest.raises(ConfigError, match="cache_text_encoder_outputs needs .* turn off shuffle_caption"):
        load_config(sd_config(cache_text_encoder_outputs=True, shuffle_caption=True))
