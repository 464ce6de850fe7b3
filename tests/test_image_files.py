"""Unusual image files: what the trainer (sizes, pixels, latent caches) and the labeller see is what an
image viewer shows; every caption source accepts the same image types and names what it skips."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageOps

from shared.errors import DatasetError
from shared.fixtures.images import make_image_folder
from shared.images.dataset import image_size, load_pixels, scan_dataset

ORIENTATION = 0x0112


def sideways_photo(path, orientation: int = 6):
    """A 96x64 landscape JPEG whose EXIF tag says: turn me 90 degrees clockwise (a phone held upright).
    Its top-left quarter is red, so the turn is visible in the pixels."""
    img = Image.new("RGB", (96, 64), (20, 20, 200))
    img.paste((220, 20, 20), (0, 0, 48, 32))
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    img.save(path, quality=95, exif=exif)
    return path


def to_array(tensor) -> np.ndarray:
    return ((tensor.permute(1, 2, 0).numpy() + 1.0) * 127.5).round()


def test_a_sideways_phone_photo_is_trained_upright(tmp_path):
    path = sideways_photo(tmp_path / "phone.jpg")
    with Image.open(path) as img:
        viewer = np.asarray(ImageOps.exif_transpose(img).convert("RGB"), dtype=np.float64)  # what viewers show
    assert viewer.shape[:2] == (96, 64)  # upright: a portrait
    assert image_size(path) == (64, 96)  # the bucket plan gets the upright size
    pixels = to_array(load_pixels(path, (64, 96), (64, 96), (0, 0), flip=False))
    assert np.abs(pixels - viewer).mean() < 1.0
    # the labeller sees the same pixels as the trainer
    from shared.autolabel.labeller import _load_pixels

    labelled = np.asarray(_load_pixels(path, lambda im: im), dtype=np.float64)
    assert np.array_equal(labelled, np.asarray(Image.fromarray(pixels.astype(np.uint8)), dtype=np.float64))


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as img:
        assert img.mode.startswith("I")  # what Pillow makes of a 16-bit greyscale PNG
    pixels = to_array(load_pixels(tmp_path / "deep.png", (64, 64), (64, 64), (0, 0), flip=False))
    expected = (ramp.astype(np.float64) / 65535 * 255).round()
    assert np.abs(pixels[..., 0] - expected).max() <= 1.0  # a grey ramp, not (almost all) white
    assert 120 < pixels.mean() < 135
    assert np.array_equal(pixels[..., 0], pixels[..., 2])


def test_transparency_is_flattened_on_white(tmp_path):
    rgba = np.zeros((64, 64, 4), np.uint8)  # black under alpha 0: what many cut-out tools leave
    rgba[:, 32:] = (200, 0, 0, 255)  # the right half: opaque red
    rgba[:32, :32, 3] = 0  # the top-left quarter: fully transparent (colour black)
    rgba[32:, :32] = (0, 0, 200, 128)  # the bottom-left quarter: half-transparent blue
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cutout.png")
    pixels = to_array(load_pixels(tmp_path / "cutout.png", (64, 64), (64, 64), (0, 0), flip=False))
    assert pixels[:32, :32].min() == 255  # white, not black
    assert np.allclose(pixels[0, 40], (200, 0, 0))
    assert np.allclose(pixels[40, 10], (127, 127, 227), atol=2)  # blue blended with white


def test_every_caption_source_takes_the_same_image_types_and_names_what_it_skips(tmp_path):
    folder = make_image_folder(tmp_path / "txt", count=2, captions="txt")
    Image.new("RGB", (64, 64), (0, 200, 0)).save(folder / "anim.gif")
    (folder / "anim.txt").write_text("a green gif")
    (folder / "phone.heic").write_bytes(b"not readable here")
    (folder / "notes.json").write_text("{}")  # not an image: not named
    scan = scan_dataset(folder)
    assert sorted(i.path.name for i in scan.items) == ["000_red_circle.png", "001_green_square.png", "anim.gif"]
    assert [name for name, _ in scan.skipped] == ["phone.heic"]
    assert "skipped 1 of a type the trainer does not read: phone.heic" in scan.summary()

    csv_folder = make_image_folder(tmp_path / "csv", count=2)
    Image.new("RGB", (64, 64), (0, 200, 0)).save(csv_folder / "anim.gif")
    (csv_folder / "phone.heic").write_bytes(b"not readable here")
    with open(csv_folder / "metadata.csv", "a", encoding="utf-8") as fh:
        fh.write("anim.gif,a green gif\nphone.heic,a phone photo\n")
    scan = scan_dataset(csv_folder)
    assert sorted(i.path.name for i in scan.items) == ["000_red_circle.png", "001_green_square.png", "anim.gif"]
    assert [name for name, _ in scan.skipped] == ["phone.heic"]
    assert "phone.heic" in scan.summary()

    from shared.autolabel.labeller import list_images

    assert [p.name for p in list_images(folder)] == [i.path.name for i in scan_dataset(folder).items]


def test_a_folder_of_only_unaccepted_images_says_what_it_found(tmp_path):
    (tmp_path / "a.heic").write_bytes(b"x")
    with pytest.raises(DatasetError, match=r"no images in .*\(looked for .*\.gif.*\); found only a\.heic"):
        scan_dataset(tmp_path)
