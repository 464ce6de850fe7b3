"""The file-writing rules the crash tests rely on, checked directly: a publish that fails half-way
leaves nothing behind (no sidecar without its LoRA, no temporary), and the restart clean-up deletes
only a killed writer's hidden temporaries."""

from __future__ import annotations

import errno

import pytest

from shared.files import publish_new, remove_leftovers


def test_a_full_disk_while_publishing_leaves_no_sidecar_and_no_temporary(tmp_path):
    def write_lora(path, name):
        path.write_bytes(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    with pytest.raises(OSError, match="No space left"):
        publish_new(tmp_path, "mine", ".safetensors", write_lora,
                    sidecars={".json": lambda p, name: p.write_text("{}")})
    assert list(tmp_path.iterdir()) == []


def test_publish_places_sidecars_then_the_file_under_a_new_name(tmp_path):
    (tmp_path / "mine.json").write_text("the user's own notes")
    path = publish_new(tmp_path, "mine", ".safetensors", lambda p, name: p.write_text(name),
                       sidecars={".json": lambda p, name: p.write_text(f"notes of {name}")})
    assert path.name == "mine_2.safetensors" and path.read_text() == "mine_2"
    assert (tmp_path / "mine_2.json").read_text() == "notes of mine_2"
    assert (tmp_path / "mine.json").read_text() == "the user's own notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.json", "mine_2.json", "mine_2.safetensors"]


def test_remove_leftovers_deletes_only_a_killed_writers_temporaries(tmp_path):
    ours = [".job0.safetensors.0123abcd.tmp", ".job0_2.json.89abcdef.tmp", ".job0-step000004.safetensors.00000000.tmp"]
    theirs = [".other.safetensors.0123abcd.tmp", "job0.safetensors", ".job0.safetensors.tmp", ".hidden", "x.tmp"]
    for name in ours + theirs:
        (tmp_path / name).write_text("x")
    (tmp_path / ".state-step000002.fedcba98.tmp").mkdir()
    removed = remove_leftovers(tmp_path, "job0")
    assert sorted(p.name for p in removed) == sorted(ours)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*theirs, ".state-step000002.fedcba98.tmp"])
    assert [p.name for p in remove_leftovers(tmp_path)] != []  # without a stem: every temporary of ours
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["job0.safetensors", ".job0.safetensors.tmp",
                                                                  ".hidden", "x.tmp"])
