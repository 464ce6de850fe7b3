"""Caption a folder of images with CLIP: the one function the CLI (and later a daemon job) calls.

Images that already have a caption are not even opened unless `overwrite` is set, so a second run
only labels what is new and needs no model when nothing is. Images that cannot be read are listed in
the result and skipped. Between batches the reporter may ask to stop: what is labelled so far is
written, nothing else changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from shared.autolabel.caption_files import CsvCaptions, TxtCaptions, backup_file
from shared.autolabel.clip_model import DEFAULT_MODEL, ClipModel, load_clip
from shared.autolabel.names import name, named
from shared.autolabel.ranking import choose_phrases, compose_caption, rank_phrases
from shared.autolabel.vocab import load_vocabulary
from shared.errors import DatasetError, UserError
from shared.image_files import IMAGE_SUFFIXES, is_image, open_rgb
from shared.reporting import Reporter

FORMATS = ("csv", "txt")


@dataclass
class LabelResult:
    output: Path  # metadata.csv, or the folder of .txt files
    format: str
    captions: dict[str, str] = field(default_factory=dict)  # image name -> new caption
    kept: list[str] = field(default_factory=list)  # images whose existing caption was left alone
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (image name, why)
    backup: Path | None = None
    stopped: bool = False
    model_source: str = ""

    def as_dict(self) -> dict:
        """Plain JSON types, for a daemon job's result message."""
        return {
            "output": str(self.output), "format": self.format, "captions": dict(self.captions),
            "kept": list(self.kept), "unreadable": [{"file": n, "why": w} for n, w in self.unreadable],
            "backup": str(self.backup) if self.backup else None, "stopped": self.stopped, "model": self.model_source,
        }

    def summary(self) -> str:
        text = f"Labelled {len(self.captions)} images"
        if self.kept:
            text += f", kept {len(self.kept)} existing captions"
        if self.captions:
            text += f"; wrote {self.output}"
        if self.backup:
            text += f" (previous captions backed up to {self.backup})"
        if self.stopped:
            text += "; stopped early on request"
        return text

    def unreadable_lines(self) -> list[str]:
        if not self.unreadable:
            return []
        return [f"Could not read {len(self.unreadable)} images (not labelled):"] + [
            f"  {name}: {why}" for name, why in self.unreadable
        ]


def list_images(folder: Path) -> list[Path]:
    """The images the trainer would find in `folder` (top level, known suffixes), sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image(p))


def _load_pixels(path: Path, preprocess):
    return preprocess(open_rgb(path))  # as the trainer sees it: upright, 8-bit, flattened on white


def _why(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _output_target(input_dir: Path, output: Path | None, fmt: str) -> Path:
    if fmt == "csv":
        if output is None:
            return input_dir / "metadata.csv"
        output = Path(output)
        return output / "metadata.csv" if output.is_dir() else output
    output = Path(output) if output is not None else input_dir
    if output.exists() and not output.is_dir():
        raise UserError(f"{name('output')} {output}: with {name('fmt')} txt, give a folder for the .txt files")
    return output


def label_folder(
    input_dir: str | Path,
    output: str | Path | None = None,
    fmt: str = "csv",
    *,
    model: str = DEFAULT_MODEL,
    pretrained: str | None = None,
    weights: str | Path | None = None,
    vocab_file: str | Path | None = None,
    builtin_vocab: bool = True,
    trigger: str | None = None,
    top_k: int = 2,
    threshold: float = 0.1,
    batch_size: int = 16,
    device: str = "auto",
    overwrite: bool = False,
    reporter: Reporter | None = None,
    clip: ClipModel | None = None,
    field_names: dict[str, str] | None = None,
) -> LabelResult:
    """Write captions for the images in `input_dir`; see the module docstring for the rules.

    `clip` lets a caller that labels several folders load the model once. `field_names` says what
    the caller calls each option (`{"weights": "clip_weights"}`), so errors name its inputs.
    """
    with named(field_names):
        return _label_folder(input_dir, output, fmt, model=model, pretrained=pretrained, weights=weights,
                             vocab_file=vocab_file, builtin_vocab=builtin_vocab, trigger=trigger, top_k=top_k,
                             threshold=threshold, batch_size=batch_size, device=device, overwrite=overwrite,
                             reporter=reporter, clip=clip)


def _label_folder(input_dir, output, fmt, *, model, pretrained, weights, vocab_file, builtin_vocab, trigger, top_k,
                  threshold, batch_size, device, overwrite, reporter, clip) -> LabelResult:
    reporter = reporter or Reporter()
    input_dir = Path(input_dir)
    if fmt not in FORMATS:
        raise UserError(f"{name('fmt')} {fmt!r}: use csv or txt")
    if top_k < 1:
        raise UserError(f"{name('top_k')} {top_k}: give at least 1")
    if not 0.0 <= threshold <= 1.0:
        raise UserError(f"{name('threshold')} {threshold}: give a probability between 0 and 1")
    if batch_size < 1:
        raise UserError(f"{name('batch_size')} {batch_size}: give at least 1")
    if trigger and ("\n" in trigger or "\r" in trigger):
        raise UserError(f"{name('trigger')}: one line only")
    if not input_dir.is_dir():
        raise DatasetError(f"{name('input_dir')}: {input_dir} is not a folder of images")
    images = list_images(input_dir)
    if not images:
        raise DatasetError(f"{name('input_dir')}: no images in {input_dir} (looked for {', '.join(IMAGE_SUFFIXES)})")

    target = _output_target(input_dir, Path(output) if output is not None else None, fmt)
    store = CsvCaptions(target, input_dir) if fmt == "csv" else TxtCaptions(target, input_dir)
    result = LabelResult(target, fmt)
    todo = []
    for image in images:
        if not overwrite and store.caption(image):
            result.kept.append(image.name)
        else:
            todo.append(image)
    if fmt == "txt" and (input_dir / "metadata.csv").is_file():
        reporter.log(f"Note: {input_dir / 'metadata.csv'} exists; the trainer reads it instead of .txt captions")
    if not todo:
        reporter.log(f"All {len(images)} images already have captions in {target}; nothing to label "
                     f"({name('overwrite')} relabels them, keeping a backup)")
        return result

    vocab = load_vocabulary(Path(vocab_file) if vocab_file else None, builtin=builtin_vocab)
    clip = clip or load_clip(model, pretrained, weights, device)
    result.model_source = clip.source
    reporter.log(f"Labelling {len(todo)} images with {clip.source} on {clip.device} "
                 f"({vocab.size} phrases in {len(vocab.categories)} categories)")
    text_features = clip.encode_texts(vocab.prompts())

    import torch

    reporter.event("label_started", total=len(todo))
    done = 0
    for start in range(0, len(todo), batch_size):
        if reporter.stop_requested():
            result.stopped = True
            break
        batch, pixels = [], []
        for image in todo[start : start + batch_size]:
            try:
                pixels.append(_load_pixels(image, clip.preprocess))
                batch.append(image)
            except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken files
                result.unreadable.append((image.name, _why(exc)))
        if batch:
            features = clip.encode_images(torch.stack(pixels))
            for image, ranked in zip(batch, rank_phrases(features, text_features, vocab, clip.logit_scale)):
                caption = compose_caption(choose_phrases(ranked, vocab, top_k, threshold), trigger)
                store.set_caption(image, caption)
                result.captions[image.name] = caption
        done += len(todo[start : start + batch_size])
        reporter.event("label_progress", done=done, total=len(todo))

    if not result.captions:
        if result.unreadable and not result.stopped:
            names = ", ".join(name for name, _ in result.unreadable[:5])
            raise DatasetError(f"{name('input_dir')}: none of the {len(todo)} images to label could be read ({names})")
        return result
    if fmt == "csv":
        if overwrite and target.exists():
            result.backup = backup_file(target)
        store.write()
    else:
        _, result.backup = store.write(backup=overwrite)
    reporter.event("label_finished", output=str(target), labelled=len(result.captions))
    return result
