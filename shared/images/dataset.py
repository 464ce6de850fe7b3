"""Image + caption data sets: a folder of images with `metadata.csv` (`file,caption`) or `.txt` captions.

A folder whose subfolders are named `N_name` (kohya's layout, e.g. `10_sks dog`) is read as one
data set per subfolder, each image seen N times per epoch.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

from shared.errors import DatasetError
from shared.image_files import IMAGE_SUFFIXES as IMAGE_SUFFIXES  # the trainer and labeller read them here
from shared.image_files import image_size as image_size
from shared.image_files import is_image, looks_like_unaccepted_image, not_accepted, open_rgb

# Masks beside their images (`<stem>.mask.png`, OneTrainer's `<stem>-masklabel.png`; shared.sd.masks):
# never trained as images themselves
MASK_SUFFIXES = (".mask.png", "-masklabel.png")
FILE_COLUMNS = ("file", "file_name", "filename", "image", "path")
CAPTION_COLUMNS = ("caption", "text", "prompt", "tags")


REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")


@dataclass
class ImageItem:
    path: Path
    caption: str
    repeats: int = 1
    subset: str = ""  # the folder the image came from (ss_dataset_dirs, ss_tag_frequency)
    is_reg: bool = False  # a regularisation image (shared/images/regularisation.py)


@dataclass
class DatasetScan:
    items: list[ImageItem]
    caption_source: str
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why): not an image type we read

    @property
    def captioned(self) -> int:
        return sum(1 for item in self.items if item.caption)

    def summary(self) -> str:
        text = f"Found {len(self.items)} images, {self.captioned} with captions ({self.caption_source})"
        if self.unreadable:
            names = ", ".join(f"{name} ({why})" for name, why in self.unreadable[:5])
            more = f" and {len(self.unreadable) - 5} more" if len(self.unreadable) > 5 else ""
            text += f"; skipped {len(self.unreadable)} unreadable: {names}{more}"
        if self.skipped:
            names = ", ".join(name for name, _ in self.skipped[:5])
            more = f" and {len(self.skipped) - 5} more" if len(self.skipped) > 5 else ""
            text += (f"; skipped {len(self.skipped)} of a type the trainer does not read: {names}{more} "
                     f"(accepted: {', '.join(IMAGE_SUFFIXES)})")
        return text


def read_metadata_csv(metadata: Path, data_dir: Path, skipped: list[tuple[str, str]] | None = None) -> list[ImageItem]:
    """Rows of `file,caption`, with or without a header; file names relative to the image folder.
    A row naming a file of a type the trainer does not read is left out and added to `skipped`."""
    try:
        with open(metadata, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except UnicodeDecodeError:
        raise DatasetError(f"{metadata}: not UTF-8 text; save it as UTF-8 CSV") from None
    except csv.Error as exc:
        raise DatasetError(f"{metadata}: not a valid CSV file ({exc})") from None
    start, file_col, caption_col = 0, 0, 1
    if rows and rows[0]:
        header = [cell.strip().lower() for cell in rows[0]]
        if header[0] in FILE_COLUMNS or any(h in CAPTION_COLUMNS for h in header):
            start = 1
            file_col = next((i for i, h in enumerate(header) if h in FILE_COLUMNS), 0)
            caption_col = next((i for i, h in enumerate(header) if h in CAPTION_COLUMNS), 1)
    items, missing = [], []
    for line_no, row in enumerate(rows[start:], start=start + 1):
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(file_col, caption_col):
            raise DatasetError(f"{metadata} line {line_no}: expected `file,caption`, got {row!r}")
        name = row[file_col].strip()
        image = (data_dir / name).resolve()
        if not image.is_relative_to(data_dir.resolve()):
            raise DatasetError(f"{metadata} line {line_no}: {name!r} points outside {data_dir}")
        if not image.is_file():
            missing.append((line_no, name))
            continue
        if not is_image(image):
            if skipped is not None:
                skipped.append((name, f"{metadata.name} line {line_no}: {not_accepted(image)}"))
            continue
        items.append(ImageItem(image, row[caption_col].strip()))
    if missing:
        line_no, name = missing[0]
        more = f" (and {len(missing) - 1} more rows)" if len(missing) > 1 else ""
        raise DatasetError(f"{metadata} line {line_no}: image {name!r} not found in {data_dir}{more}")
    return items


def _check_readable(items: list[ImageItem]) -> tuple[list[ImageItem], list[tuple[str, str]]]:
    from PIL import Image

    good, bad = [], []
    for item in items:
        try:
            with Image.open(item.path) as img:
                img.verify()
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken files
            bad.append((item.path.name, type(exc).__name__))
            continue
        good.append(item)
    return good, bad


def scan_dataset(data_dir: Path, metadata_path: Path | None = None, caption_extension: str = ".txt", *,
                 key: str = "train_data_dir", class_captions: bool = False) -> DatasetScan:
    """The images of a folder and their captions. `key` names the setting in messages; with
    `class_captions`, an image without a caption in an `N_name` folder is captioned `name` (kohya's class
    tokens: how regularisation folders such as `1_dog` are captioned)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DatasetError(f"{key}: {data_dir} is not a folder of images")
    subsets = sorted(p for p in data_dir.iterdir() if p.is_dir() and REPEAT_FOLDER.match(p.name))
    has_images = any(is_image(p) for p in data_dir.iterdir() if p.is_file())
    if subsets and not has_images and metadata_path is None:
        scans = []
        for sub in subsets:
            repeats = int(REPEAT_FOLDER.match(sub.name).group(1))
            if repeats < 1:
                raise DatasetError(f"{key}: {sub.name}: the repeat count before '_' must be at least 1")
            scan = _scan_folder(sub, None, caption_extension, key)
            for item in scan.items:
                item.repeats, item.subset = repeats, sub.name
                if class_captions and not item.caption:
                    item.caption = REPEAT_FOLDER.match(sub.name).group(2)
            scan.skipped = [(f"{sub.name}/{name}", why) for name, why in scan.skipped]
            scans.append(scan)
        return DatasetScan(
            [i for s in scans for i in s.items],
            f"{len(subsets)} N_name folders, {scans[0].caption_source}",
            [u for s in scans for u in s.unreadable],
            [skip for s in scans for skip in s.skipped],
        )
    scan = _scan_folder(data_dir, metadata_path, caption_extension, key)
    for item in scan.items:
        item.subset = data_dir.name
    return scan


def _scan_folder(data_dir: Path, metadata_path: Path | None, caption_extension: str,
                 key: str = "train_data_dir") -> DatasetScan:
    default_csv = data_dir / "metadata.csv"
    if metadata_path is None and default_csv.is_file():
        metadata_path = default_csv
    skipped: list[tuple[str, str]] = []
    if metadata_path is not None:
        items = read_metadata_csv(Path(metadata_path), data_dir, skipped)
        source = Path(metadata_path).name
        if not items and skipped:
            raise DatasetError(f"{metadata_path}: every row names a file the trainer does not read "
                               f"({skipped[0][0]}: {not_accepted(Path(skipped[0][0]))})")
        if not items:
            raise DatasetError(f"{metadata_path}: no rows; expected `file,caption` lines")
    else:
        files = sorted(p for p in data_dir.iterdir() if p.is_file() and not p.name.lower().endswith(MASK_SUFFIXES))
        images = [p for p in files if is_image(p)]
        skipped = [(p.name, not_accepted(p)) for p in files if looks_like_unaccepted_image(p)]
        if not images:
            others = f"; found only {', '.join(name for name, _ in skipped[:5])}" if skipped else ""
            raise DatasetError(
                f"{key}: no images in {data_dir} (looked for {', '.join(IMAGE_SUFFIXES)}){others}"
            )
        items = []
        for image in images:
            txt = image.with_suffix(caption_extension)
            try:
                caption = txt.read_text(encoding="utf-8").strip() if txt.is_file() else ""
            except UnicodeDecodeError:
                raise DatasetError(f"{txt}: not UTF-8 text; save the caption as UTF-8") from None
            items.append(ImageItem(image, caption))
        source = f"{caption_extension} captions"
    good, bad = _check_readable(items)
    if not good:
        raise DatasetError(f"{key}: none of the {len(items)} images in {data_dir} can be read")
    return DatasetScan(good, source, bad, skipped)


def process_caption(caption: str, *, trigger_word: str | None, shuffle: bool, keep_tokens: int,
                    dropout_rate: float, rng) -> str:
    """The caption one step sees: trigger word first, comma-separated tags after the first
    `keep_tokens` shuffled, or the whole caption dropped (empty) with `dropout_rate`."""
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    keep = keep_tokens
    if trigger_word:
        if trigger_word in tags:
            tags.remove(trigger_word)
        tags.insert(0, trigger_word)
        keep = max(keep, 1)
    if shuffle and len(tags) > keep:
        rest = tags[keep:]
        rng.shuffle(rest)
        tags = tags[:keep] + rest
    if dropout_rate > 0 and rng.random() < dropout_rate:
        return ""
    return ", ".join(tags)


def plan_crop(size: tuple[int, int], bucket: tuple[int, int], *, random_crop: bool, rng):
    """How an image of `size` (w, h) becomes `bucket` (w, h): the size it is resized to (covering
    the bucket) and the crop's (top, left). SDXL is told the original size and the crop."""
    width, height = bucket
    scale = max(width / size[0], height / size[1])
    resized = (max(width, round(size[0] * scale)), max(height, round(size[1] * scale)))
    if random_crop:
        crop = (rng.randint(0, resized[1] - height), rng.randint(0, resized[0] - width))
    else:
        crop = ((resized[1] - height) // 2, (resized[0] - width) // 2)
    return resized, crop


def load_pixels(path: Path, bucket: tuple[int, int], resized: tuple[int, int], crop: tuple[int, int], flip: bool):
    """The image resized, cropped to `bucket`, maybe mirrored, as a [3, h, w] tensor in [-1, 1]."""
    import numpy as np
    import torch

    img = open_rgb(path)  # upright, 8-bit, transparency flattened: as the bucket plan measured it
    img = fit_to_bucket(img, bucket, resized, crop, flip)
    return torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0


def fit_to_bucket(img, bucket: tuple[int, int], resized: tuple[int, int], crop: tuple[int, int], flip: bool):
    """A PIL image resized to `resized`, cropped at `crop` (top, left) to `bucket`, maybe mirrored:
    what every per-pixel input of a sample (the image, its mask) goes through."""
    from PIL import Image

    width, height = bucket
    if resized != img.size:
        enlarge = resized[0] > img.width
        img = img.resize(resized, Image.Resampling.BICUBIC if enlarge else Image.Resampling.LANCZOS)
    top, left = crop
    img = img.crop((left, top, left + width, top + height))
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


def tag_frequency(items: list[ImageItem]) -> dict[str, dict[str, int]]:
    """kohya's ss_tag_frequency: per folder, how many captions hold each comma-separated tag."""
    out: dict[str, dict[str, int]] = {}
    for item in items:
        counts = out.setdefault(item.subset, {})
        for tag in {t.strip() for t in item.caption.split(",") if t.strip()}:
            counts[tag] = counts.get(tag, 0) + 1
    return out


def dataset_dirs(items: list[ImageItem]) -> dict[str, dict[str, int]]:
    """kohya's ss_dataset_dirs: per folder, its repeat count and number of images."""
    out: dict[str, dict[str, int]] = {}
    for item in items:
        entry = out.setdefault(item.subset, {"n_repeats": item.repeats, "img_count": 0})
        entry["img_count"] += 1
    return out


def tokenize(tokenizers: list, captions: list[str]):
    """One [batch, 77] id tensor per tokenizer."""
    return [
        tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
            return_tensors="pt").input_ids
        for tok in tokenizers
    ]
