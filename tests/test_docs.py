"""Generated documentation matches the code it describes, and the project cites only its own documents."""

import subprocess
from pathlib import Path

from shared import schema
from shared.config_docs import protocol_doc, render

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"


def test_config_reference_is_current():
    text = (DOCS / "config.md").read_text(encoding="utf-8")
    assert text == render(), "docs/config.md is stale: run python -m shared.config_docs"
    for name in schema.TRAIN:
        assert f"| `{name}` |" in text


def test_the_protocol_docs_list_the_current_job_config():
    text = (DOCS / "protocol.md").read_text(encoding="utf-8")
    assert text == protocol_doc(text), "docs/protocol.md's job config table is stale: run python -m shared.config_docs"
    for name in schema.TRAIN:
        assert f"| `{name}` |" in text


def test_no_file_cites_the_field_notes():
    """The facts comments rely on are written in the comment or in docs/, not in a file outside the project."""
    name = "FIELD" + "-NOTES"  # spelled apart, so this file does not cite it either
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    citing = [f for f in files if (REPO / f).is_file() and name in (REPO / f).read_text(errors="replace")]
    assert citing == []


def test_the_sd_training_guide_covers_the_issue_20_keys_and_every_preset():
    """docs/sd-training.md explains each key of the issue 20 sections (LyCORIS, blocks, optimizer, EMA,
    masks, presets) and has a row for every shipped preset, with its family and card."""
    from shared.presets import list_presets

    text = (DOCS / "sd-training.md").read_text(encoding="utf-8")
    sections = {"LoRA type (LyCORIS)", "Block control (SD)", "Optimizer", "EMA", "Masked loss (SD)", "Preset"}
    keys = [s.name for s in schema.TRAIN.values() if s.section in sections]
    assert len(keys) >= 30 and [k for k in keys if f"`{k}`" not in text] == []
    from shared.schema.optimizer import OPTIMIZER_ARGS

    for name, args in OPTIMIZER_ARGS.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| `{name}`"))
        assert all(f"`{a}`" in row for a in args), name
    families = {"sd1": "SD1.5", "sdxl": "SDXL", "flux": "Flux.1-dev"}
    for preset in list_presets():
        row = next(line for line in text.splitlines() if line.startswith(f"| `{preset.name}` |"))
        assert f"| {families[preset.family]} | {preset.card} |" in row, preset.name
