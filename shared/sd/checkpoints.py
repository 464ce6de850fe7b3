"""Resumable training states and the keep-last-N rule.

A state is a folder `state-stepNNNNNN/` beside the LoRA checkpoints: the LoRA tensors, optimizer,
LR scheduler, RNG states and `trainer.json` (step, epoch, position in the epoch's batch list). It
is written under a hidden temporary name and renamed when complete, and `trainer.json` is its last
file, so a kill during a save leaves either no state or a whole one: never a broken one.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from pathlib import Path

from shared.errors import ConfigError

STATE_DIR = re.compile(r"^state-step(\d+)$")
CHECKPOINT_FILE = re.compile(r"^(?P<stem>.+)-step(?P<step>\d+)\.safetensors$")


def state_name(step: int) -> str:
    return f"state-step{step:06d}"


def list_states(folder: Path) -> list[tuple[int, Path]]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    out = []
    for path in folder.iterdir():
        match = STATE_DIR.match(path.name)
        if match and path.is_dir() and (path / "trainer.json").is_file():
            out.append((int(match.group(1)), path))
    return sorted(out)


def resolve_resume(resume: str | None, checkpoints: Path) -> Path | None:
    """The state folder to continue from; None to start fresh (`latest` with no state yet)."""
    if not resume:
        return None
    if resume == "latest":
        states = list_states(checkpoints)
        return states[-1][1] if states else None
    # a name inside this run's own checkpoints folder, never an arbitrary path: the daemon confines
    # path keys, and `resume` is not one
    if "/" in resume or "\\" in resume or resume in (".", ".."):
        raise ConfigError(f"resume: {resume!r} must be `latest` or the name of a state folder in {checkpoints} "
                          "(e.g. state-step000200), not a path")
    path = Path(checkpoints) / resume
    if not (path / "trainer.json").is_file():
        raise ConfigError(f"resume: {path} is not a training state folder (no trainer.json); use `latest` or a "
                          f"state-stepNNNNNN folder from {checkpoints}")
    return path


def save_state(folder: Path, step: int, *, lora: dict, optimizer, scheduler, rng: dict, trainer: dict) -> Path:
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / state_name(step)
    tmp = folder / f".{state_name(step)}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        save_file(lora, str(tmp / "lora.safetensors"))
        torch.save(optimizer.state_dict(), str(tmp / "optimizer.pt"))
        torch.save(scheduler.state_dict(), str(tmp / "scheduler.pt"))
        torch.save(rng, str(tmp / "rng.pt"))
        (tmp / "trainer.json").write_text(json.dumps({**trainer, "step": step}, indent=2), encoding="utf-8")
        for name in os.listdir(tmp):
            with open(tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # a state of the same step from an earlier, interrupted run
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_state(path: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    try:
        return {
            "lora": load_file(str(path / "lora.safetensors")),
            "optimizer": torch.load(str(path / "optimizer.pt"), map_location="cpu", weights_only=True),
            "scheduler": torch.load(str(path / "scheduler.pt"), map_location="cpu", weights_only=True),
            "rng": torch.load(str(path / "rng.pt"), map_location="cpu", weights_only=True),
            "trainer": json.loads((path / "trainer.json").read_text(encoding="utf-8")),
        }
    except Exception as exc:  # noqa: BLE001 - any damage means the same thing to the user
        raise ConfigError(f"resume: {path} cannot be read ({type(exc).__name__}: {str(exc)[:150]})") from None


def prune(folder: Path, keep: int, stem: str) -> None:
    """Keep the newest `keep` states and `<stem>-stepN.safetensors` files (0 keeps everything).
    Leftover temporary folders of killed saves are removed too."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.name.startswith(".state-step") and path.name.endswith(".tmp"):
            shutil.rmtree(path, ignore_errors=True)
    if keep <= 0:
        return
    for _, path in list_states(folder)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    files = []
    for path in folder.iterdir():
        match = CHECKPOINT_FILE.match(path.name)
        if match and match.group("stem") == stem:
            files.append((int(match.group("step")), path))
    for _, path in sorted(files)[:-keep]:
        path.unlink(missing_ok=True)


def rng_state(generator) -> dict:
    import torch

    state = {"torch": torch.get_rng_state(), "noise": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, generator) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    generator.set_state(state["noise"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
