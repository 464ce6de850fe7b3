"""Image + caption data sets: a folder of images with `metadata.csv` (`file,caption`) or `.txt` captions."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from shared.errors import DatasetError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FILE_COLUMNS = ("file", "file_name", "filename", "image", "path")
CAPTION_COLUMNS = ("caption", "text", "prompt", "tags")


@dataclass
class ImageItem:
    path: Path
    caption: str


@dataclass
class DatasetScan:
    items: list[ImageItem]
    caption_source: str
    unreadable: list[tuple[str, str]] = field(default_factory=list)

    @property
    def captioned(self) -> int:
        return sum(1 for item in self.items if item.caption)

    def summary(self) -> str:
        text = f"Found {len(self.items)} images, {self.captioned} with captions ({self.caption_source})"
        if self.unreadable:
            names = ", ".join(f"{name} ({why})" for name, why in self.unreadable[:5])
            more = f" and {len(self.unreadable) - 5} more" if len(self.unreadable) > 5 else ""
            text += f"; skipped {len(self.unreadable)} unreadable: {names}{more}"
        return text


def read_metadata_csv(metadata: Path, data_dir: Path) -> list[ImageItem]:
    """Rows of `file,caption`, with or without a header; file names relative to the image folder."""
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


def scan_dataset(data_dir: Path, metadata_path: Path | None = None) -> DatasetScan:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DatasetError(f"train_data_dir: {data_dir} is not a folder of images")
    default_csv = data_dir / "metadata.csv"
    if metadata_path is None and default_csv.is_file():
        metadata_path = default_csv
    if metadata_path is not None:
        items = read_metadata_csv(Path(metadata_path), data_dir)
        source = Path(metadata_path).name
        if not items:
            raise DatasetError(f"{metadata_path}: no rows; expected `file,caption` lines")
    else:
        images = sorted(p for p in data_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not images:
            raise DatasetError(
                f"train_data_dir: no images in {data_dir} (looked for {', '.join(IMAGE_SUFFIXES)})"
            )
        items = []
        for image in images:
            txt = image.with_suffix(".txt")
            caption = txt.read_text(encoding="utf-8").strip() if txt.is_file() else ""
            items.append(ImageItem(image, caption))
        source = ".txt captions"
    good, bad = _check_readable(items)
    if not good:
        raise DatasetError(f"train_data_dir: none of the {len(items)} images in {data_dir} can be read")
    return DatasetScan(good, source, bad)


class ImageCaptionDataset:
    """Torch dataset: resize the short side to `resolution`, centre-crop, scale to [-1, 1], tokenize."""

    def __init__(self, items: list[ImageItem], tokenizer, resolution: int):
        self.items = items
        self.tokenizer = tokenizer
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        import numpy as np
        import torch
        from PIL import Image

        item = self.items[index]
        with Image.open(item.path) as img:
            img = img.convert("RGB")
            scale = self.resolution / min(img.size)
            size = (max(self.resolution, round(img.width * scale)), max(self.resolution, round(img.height * scale)))
            img = img.resize(size, Image.Resampling.BICUBIC)
            left = (img.width - self.resolution) // 2
            top = (img.height - self.resolution) // 2
            img = img.crop((left, top, left + self.resolution, top + self.resolution))
            pixels = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
        ids = self.tokenizer(
            item.caption, padding="max_length", max_length=self.tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids[0]
        return {"pixel_values": pixels, "input_ids": ids}
