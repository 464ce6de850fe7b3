"""Reading and writing captions without losing any a person wrote.

`metadata.csv` is merged: its rows (and any extra columns, its header or lack of one) stay as they
are; an image gets a row only if it has none or an empty caption, and with `overwrite` its caption
is replaced after the old file was copied to `metadata.csv.bak-<time>`. `.txt` sidecars work the same
way per image; with `overwrite` the replaced ones are first copied into `caption_backup_<time>/`
(a subfolder, so the trainer never mistakes a backup for a caption). Every file is written with
`atomic_write`: a crash leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import csv
import io
import shutil
import time
from pathlib import Path

from shared.errors import UserError
from shared.files import atomic_write
from shared.images.dataset import CAPTION_COLUMNS, FILE_COLUMNS

CSV_HEADER = ["file", "caption"]


def _timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def _unused(path: Path) -> Path:
    candidate, n = path, 2
    while candidate.exists():
        candidate = path.with_name(f"{path.name}-{n}")
        n += 1
    return candidate


def backup_file(path: Path) -> Path:
    """Copy `path` to `<name>.bak-<time>` beside it (never over an earlier backup)."""
    target = _unused(path.with_name(f"{path.name}.bak-{_timestamp()}"))
    atomic_write(target, lambda tmp: shutil.copy2(path, tmp))
    return target


class CsvCaptions:
    """An existing or new `metadata.csv`, rows kept as read."""

    def __init__(self, path: Path, image_dir: Path):
        self.path = Path(path)
        self.image_dir = Path(image_dir)
        self.header: list[str] | None = list(CSV_HEADER)
        self.rows: list[list[str]] = []
        self.file_col, self.caption_col = 0, 1
        self.bom = False
        self._index: dict[Path, int] = {}
        if self.path.exists():
            self._read()

    def _read(self) -> None:
        raw = self.path.read_bytes()
        self.bom = raw.startswith(b"\xef\xbb\xbf")
        try:
            rows = list(csv.reader(io.StringIO(raw.decode("utf-8-sig"), newline="")))
        except UnicodeDecodeError:
            raise UserError(f"{self.path}: not UTF-8 text; save it as UTF-8 CSV (or pass --overwrite to replace it, "
                            "keeping a backup)") from None
        except csv.Error as exc:
            raise UserError(f"{self.path}: not a valid CSV file ({exc}); fix it or pass --overwrite "
                            "to replace it, keeping a backup") from None
        if not any(rows):
            return  # an empty file: written fresh, with the header
        self.header = None
        if rows and rows[0]:
            # the same header rule as the trainer's reader (shared/images/dataset.py)
            names = [cell.strip().lower() for cell in rows[0]]
            if names[0] in FILE_COLUMNS or any(n in CAPTION_COLUMNS for n in names):
                self.header = rows[0]
                rows = rows[1:]
                self.file_col = next((i for i, n in enumerate(names) if n in FILE_COLUMNS), 0)
                self.caption_col = next((i for i, n in enumerate(names) if n in CAPTION_COLUMNS), 1)
        self.rows = rows
        for i, row in enumerate(rows):
            if len(row) > self.file_col and row[self.file_col].strip():
                self._index.setdefault(self._key(row[self.file_col].strip()), i)

    def _key(self, name: str) -> Path:
        return (self.image_dir / name).resolve()

    def caption(self, image: Path) -> str | None:
        """The caption given for `image`, or None when it has no row."""
        i = self._index.get(image.resolve())
        if i is None:
            return None
        row = self.rows[i]
        return row[self.caption_col].strip() if len(row) > self.caption_col else ""

    def set_caption(self, image: Path, caption: str) -> None:
        i = self._index.get(image.resolve())
        if i is None:
            width = max(self.file_col, self.caption_col) + 1
            if self.header is not None:
                width = max(width, len(self.header))
            row = [""] * width
            row[self.file_col] = image.relative_to(self.image_dir).as_posix()
            self.rows.append(row)
            self._index[image.resolve()] = len(self.rows) - 1
            i = len(self.rows) - 1
        row = self.rows[i]
        if len(row) <= self.caption_col:
            row.extend([""] * (self.caption_col + 1 - len(row)))
        row[self.caption_col] = caption

    def write(self) -> Path:
        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="", encoding="utf-8-sig" if self.bom else "utf-8") as fh:
                writer = csv.writer(fh)
                if self.header is not None:
                    writer.writerow(self.header)
                writer.writerows(self.rows)

        return atomic_write(self.path, write)


class TxtCaptions:
    """`.txt` sidecars next to the images (or in `folder` when that differs)."""

    def __init__(self, folder: Path, image_dir: Path):
        self.folder = Path(folder)
        self.image_dir = Path(image_dir)
        self.pending: dict[Path, str] = {}

    def sidecar(self, image: Path) -> Path:
        return self.folder / image.relative_to(self.image_dir).with_suffix(".txt")

    def caption(self, image: Path) -> str | None:
        path = self.sidecar(image)
        if not path.is_file():
            return None
        # a file that is not UTF-8 is still someone's caption: it counts, and stays unless --overwrite
        return path.read_bytes().decode("utf-8-sig", errors="replace").strip()

    def set_caption(self, image: Path, caption: str) -> None:
        self.pending[image] = caption

    def write(self, backup: bool) -> tuple[list[Path], Path | None]:
        """Write the pending captions; with `backup`, first copy the files they replace into a folder."""
        backup_dir = None
        written = []
        for image, caption in self.pending.items():
            target = self.sidecar(image)
            if backup and target.is_file() and target.stat().st_size > 0:
                if backup_dir is None:
                    backup_dir = _unused(self.folder / f"caption_backup_{_timestamp()}")
                    backup_dir.mkdir(parents=True)
                shutil.copy2(target, backup_dir / target.name)
            atomic_write(target, lambda tmp, text=caption: tmp.write_text(text + "\n", encoding="utf-8"))
            written.append(target)
        return written, backup_dir
