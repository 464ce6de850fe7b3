"""`python -m daemon label`: captions a folder with a tiny open_clip model, never loses a person's captions."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.cli import main
from shared.autolabel import label_folder
from shared.errors import ModelError, UserError
from shared.fixtures.images import make_image_folder
from shared.images.dataset import scan_dataset
from shared.reporting import Reporter

REPO = Path(__file__).resolve().parent.parent
TRIGGER = 'my "sks", style'
QUOTED_PHRASE = 'a "quoted", phrase'


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> dict[str, Path]:
    from shared.fixtures.tiny_clip import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture
def folder(tmp_path) -> Path:
    """Six uncaptioned images and one file that only pretends to be a PNG."""
    folder = make_image_folder(tmp_path / "images", count=6, captions="none")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return folder


def label_args(folder: Path, tiny_clip: dict, *extra: str) -> list[str]:
    return ["label", "--input", str(folder), "--model", str(tiny_clip["config"]),
            "--weights", str(tiny_clip["weights"]), "--device", "cpu", *extra]


def read_rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def test_one_caption_per_readable_image_in_the_trainers_csv_format(folder, tiny_clip, tmp_path, capsys):
    vocab = tmp_path / "mine.json"
    vocab.write_text(json.dumps({"categories": [{"name": "mine", "phrases": [QUOTED_PHRASE], "always_keep": True}]}))

    rc = main(label_args(folder, tiny_clip, "--trigger", TRIGGER, "--vocab", str(vocab)))

    out = capsys.readouterr().out
    assert rc == 0
    assert "Could not read 1 images" in out and "broken.png" in out
    rows = read_rows(folder / "metadata.csv")
    assert rows[0] == ["file", "caption"]
    assert sorted(r[0] for r in rows[1:]) == [f"{i:03d}_{c}" for i, c in enumerate(
        ["red_circle.png", "green_square.png", "blue_triangle.png", "yellow_circle.png", "red_square.png",
         "green_triangle.png"])]
    # the trainer reads the same captions back, commas and quotes included
    scan = scan_dataset(folder)
    assert scan.caption_source == "metadata.csv"
    assert len(scan.items) == 6 and scan.unreadable == []
    by_name = dict((r[0], r[1]) for r in rows[1:])
    for item in scan.items:
        assert item.caption == by_name[item.path.name]
        assert item.caption.startswith(TRIGGER + ", ")
        assert QUOTED_PHRASE in item.caption
    raw = (folder / "metadata.csv").read_text(encoding="utf-8")
    assert '"my ""sks"", style, ' in raw and '""quoted"", phrase' in raw


def test_caption_puts_style_words_first(folder, tiny_clip):
    result = label_folder(folder, model=str(tiny_clip["config"]), weights=tiny_clip["weights"], device="cpu",
                          top_k=1, threshold=0.0, trigger="zxq")
    from shared.autolabel.vocab import builtin_vocabulary

    vocab = builtin_vocabulary()
    assert [c.name for c in vocab.categories][:2] == ["styles", "mediums"]
    for caption in result.captions.values():
        parts = caption.split(", ")
        # threshold 0, top-k 1: exactly one phrase per category, in category order after the trigger
        assert parts[0] == "zxq" and len(parts) == 1 + len(vocab.categories)
        for part, category in zip(parts[1:], vocab.categories):
            assert part in category.phrases


def test_existing_captions_survive_a_second_run(tmp_path, tiny_clip, capsys):
    folder = make_image_folder(tmp_path / "images", count=5, captions="none")
    mine = 'hand-written, with "quotes"'
    with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file_name", "text", "notes"])  # another header the trainer accepts, extra column
        writer.writerow(["000_red_circle.png", mine, "keep me"])
        writer.writerow(["001_green_square.png", "", "empty caption"])
    before = read_rows(folder / "metadata.csv")

    assert main(label_args(folder, tiny_clip)) == 0

    rows = read_rows(folder / "metadata.csv")
    assert rows[:2] == before[:2]  # header and the written caption untouched
    assert rows[2][0] == "001_green_square.png" and rows[2][1] and rows[2][2] == "empty caption"
    assert [r[0] for r in rows[3:]] == ["002_blue_triangle.png", "003_yellow_circle.png", "004_red_square.png"]
    assert all(r[1] for r in rows[1:])
    assert {i.path.name: i.caption for i in scan_dataset(folder).items}["000_red_circle.png"] == mine

    first = (folder / "metadata.csv").read_bytes()
    capsys.readouterr()
    assert main(label_args(folder, tiny_clip)) == 0
    assert "nothing to label" in capsys.readouterr().out
    assert (folder / "metadata.csv").read_bytes() == first
    assert not list(folder.glob("metadata.csv.bak-*"))


def test_overwrite_keeps_a_backup(tmp_path, tiny_clip):
    folder = make_image_folder(tmp_path / "images", count=3, captions="csv")
    original = (folder / "metadata.csv").read_bytes()

    assert main(label_args(folder, tiny_clip, "--overwrite", "--trigger", "zxq")) == 0

    backups = list(folder.glob("metadata.csv.bak-*"))
    assert len(backups) == 1 and backups[0].read_bytes() == original
    assert all(item.caption.startswith("zxq, ") for item in scan_dataset(folder).items)
    # a second overwrite keeps the first backup and adds its own
    assert main(label_args(folder, tiny_clip, "--overwrite")) == 0
    assert len(list(folder.glob("metadata.csv.bak-*"))) == 2
    assert backups[0].read_bytes() == original


def test_txt_sidecars_are_merged_and_backed_up(tmp_path, tiny_clip):
    folder = make_image_folder(tmp_path / "images", count=3, captions="txt")
    (folder / "002_blue_triangle.txt").unlink()
    mine = (folder / "000_red_circle.txt").read_text()

    assert main(label_args(folder, tiny_clip, "--format", "txt", "--trigger", "zxq")) == 0

    assert (folder / "000_red_circle.txt").read_text() == mine
    assert (folder / "002_blue_triangle.txt").read_text().startswith("zxq, ")
    scan = scan_dataset(folder)
    assert scan.caption_source == ".txt captions" and all(item.caption for item in scan.items)

    assert main(label_args(folder, tiny_clip, "--format", "txt", "--overwrite", "--trigger", "zxq")) == 0
    assert (folder / "000_red_circle.txt").read_text().startswith("zxq, ")
    (backup_dir,) = folder.glob("caption_backup_*")
    assert (backup_dir / "000_red_circle.txt").read_text() == mine
    assert len(scan_dataset(folder).items) == 3  # the backup folder is not mistaken for data


def test_only_unreadable_images_is_one_clear_error(tmp_path, tiny_clip, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"nope")
    (folder / "b.jpg").write_bytes(b"")
    assert main(label_args(folder, tiny_clip)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "none of the 2 images to label could be read (a.png, b.jpg)" in errors[0]
    assert not (folder / "metadata.csv").exists()


def test_stop_request_writes_what_was_labelled(tmp_path, tiny_clip):
    folder = make_image_folder(tmp_path / "images", count=5, captions="none")

    class StopAfterFirstBatch(Reporter):
        batches = 0

        def log(self, message):
            pass

        def event(self, kind, **data):
            if kind == "label_progress":
                self.batches += 1

        def stop_requested(self):
            return self.batches >= 1

    result = label_folder(folder, model=str(tiny_clip["config"]), weights=tiny_clip["weights"], device="cpu",
                          batch_size=2, reporter=StopAfterFirstBatch())
    assert result.stopped and len(result.captions) == 2
    json.dumps(result.as_dict())  # what a daemon job sends back
    assert [r[0] for r in read_rows(folder / "metadata.csv")[1:]] == ["000_red_circle.png", "001_green_square.png"]


def test_user_vocabulary_txt_sections(tmp_path):
    from shared.autolabel.vocab import load_vocabulary

    vocab_file = tmp_path / "v.txt"
    vocab_file.write_text("# mine\nzebra stripes\n[subjects]\na unicorn\n[outfits]\nred coat\nred coat\n")
    vocab = load_vocabulary(vocab_file)
    names = [c.name for c in vocab.categories]
    assert names == ["styles", "mediums", "subjects", "custom", "outfits", "colours", "lighting", "composition"]
    subjects = vocab.categories[2]
    assert subjects.phrases[-1] == "a unicorn" and subjects.always_keep
    assert vocab.categories[4].phrases == ("red coat",)
    assert len(vocab.prompts()) == vocab.size

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"categories": [{"name": "x", "phrases": ["y"], "template": "no slot"}]}))
    with pytest.raises(UserError, match="bad.json category 'x': template must contain exactly one"):
        load_vocabulary(bad)
    with pytest.raises(UserError, match="--no-builtin-vocab needs --vocab"):
        load_vocabulary(None, builtin=False)


def test_weights_found_in_the_local_hf_cache(tmp_path, tiny_clip, monkeypatch):
    """A pretrained tag whose file sits in the HF cache loads from there, without any download."""
    import shutil

    import torch
    from open_clip import pretrained as oc_pretrained

    from shared.autolabel.clip_model import load_clip, resolve_weights

    tags = {"testtag": {"hf_hub": "local-test/tiny-clip/", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}}
    monkeypatch.setitem(oc_pretrained._PRETRAINED, "tiny-clip-test", tags)
    cache = tmp_path / "hub"
    snapshot = cache / "models--local-test--tiny-clip" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (cache / "models--local-test--tiny-clip" / "refs").mkdir()
    (cache / "models--local-test--tiny-clip" / "refs" / "main").write_text("abc123")
    config = str(tiny_clip["config"])
    with pytest.raises(ModelError, match="no open_clip weights for tiny-clip-test on this machine"):
        resolve_weights(config, cache_dir=str(cache))
    shutil.copy(tiny_clip["weights"], snapshot / "open_clip_model.safetensors")

    resolved = resolve_weights(config, cache_dir=str(cache))
    assert resolved.checkpoint == snapshot / "open_clip_model.safetensors"
    clip = load_clip(config, pretrained="testtag", device="cpu", cache_dir=str(cache))
    assert "'testtag' from the local cache" in clip.source
    normalize = [t for t in clip.preprocess.transforms if type(t).__name__ == "Normalize"][0]
    assert tuple(normalize.mean) == (0.5, 0.5, 0.5)  # the tag's own preprocessing, not the default
    from safetensors.torch import load_file

    saved = load_file(str(tiny_clip["weights"]))
    assert torch.equal(clip.model.state_dict()["text_projection"], saved["text_projection"])


def run_cli(*args, home: Path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "HOME": str(home),
           "HF_HOME": str(home / "hf"), "XDG_CACHE_HOME": str(home / "cache")}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-m", "daemon", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300)


def test_missing_weights_give_one_clear_error(folder, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    proc = run_cli("label", "--input", str(folder), home=home)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    line = errors[0]
    assert "no open_clip weights for ViT-B-32 on this machine" in line
    assert "--weights /path/to/open_clip_model.safetensors" in line
    assert "hf download laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in line
    assert f"into {home / 'hf' / 'hub'}" in line  # where to put a cached model
    assert not (folder / "metadata.csv").exists()



def test_missing_weights_file_is_one_clear_error(folder, tmp_path, capsys):
    assert main(["label", "--input", str(folder), "--weights", str(tmp_path / "nope.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --weights: ") and len(err.splitlines()) == 1
    assert "nope.safetensors not found" in err and "open_clip checkpoint" in err


def test_checkpoint_of_another_architecture_is_one_clear_error(folder, tiny_clip, capsys):
    # the tiny model's weights, but --model left at its default ViT-B-32
    assert main(["label", "--input", str(folder), "--weights", str(tiny_clip["weights"]), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert "cannot load as open_clip ViT-B-32 weights" in err and "check that --model matches" in err
    assert not (folder / "metadata.csv").exists()


def test_weights_folder_with_open_clip_config(tmp_path, tiny_clip):
    """A model folder as the hub serves it (open_clip_config.json + open_clip_model.safetensors) loads as is."""
    import shutil

    from shared.fixtures.tiny_clip import TINY_CLIP_CONFIG

    model_dir = tmp_path / "my-clip"
    model_dir.mkdir()
    (model_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CONFIG}))
    with pytest.raises(ModelError, match="has open_clip_config.json but no .safetensors"):
        label_folder(make_image_folder(tmp_path / "a", count=2, captions="none"), weights=model_dir)
    shutil.copy(tiny_clip["weights"], model_dir / "open_clip_model.safetensors")
    folder = make_image_folder(tmp_path / "images", count=2, captions="none")
    result = label_folder(folder, weights=model_dir, device="cpu")
    assert len(result.captions) == 2 and result.model_source == str(model_dir)
