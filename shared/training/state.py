"""Resumable training states, one format for every task, and the keep-last-N rule.

A state is a folder `checkpoints/state-stepNNNNNN/` beside the loadable checkpoints
(`<name>-stepNNNNNN.safetensors` for SD, a `<name>-stepNNNNNN/` adapter folder for LLMs):

- `lora.safetensors`: the trained tensors by name (the task's `trainable()`);
- `optimizer.pt`, `scheduler.pt`: their state dicts;
- `rng.pt`: every rank's torch (and CUDA) RNG state;
- `extras.pt` (where the loop keeps more, e.g. the EMA's shadow weights): tensors and numbers by name;
- `trainer.json`, written last: step, epoch, the next micro-batch of the epoch, the losses so far,
  the start time, and the fingerprint of the settings a resume must match.

It is written under a hidden temporary name and renamed when complete, so a kill during a save leaves
either no state or a whole one. Everything is read back without unpickling code: tensors from
safetensors, the rest with `torch.load(weights_only=True)` or as JSON.

accelerate's `save_state`/`load_state` do not serve here: they save each prepared model's whole
state dict (the frozen base too: gigabytes per state where the adapter is megabytes), load objects
registered for checkpointing with `weights_only=False` (unpickling whatever the folder holds), skip
a missing or damaged RNG file with only an info log (a resume that quietly diverges), write into the
target folder directly (a kill leaves half a state), and must run on every process.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from pathlib import Path

from shared.errors import ConfigError
from shared.files import remove_leftovers

STATE_DIR = re.compile(r"^state-step(\d+)$")
CHECKPOINT = re.compile(r"^(?P<stem>.+)-step(?P<step>\d+)(\.safetensors)?$")


def state_name(step: int) -> str:
    return f"state-step{step:06d}"


def checkpoint_name(stem: str, step: int, suffix: str) -> str:
    """The loadable adapter saved at `step`: a file with `suffix`, or a folder without one."""
    if not suffix and stem == "state":  # the folder would be the state's own name
        stem = "state_adapter"
    return f"{stem}-step{step:06d}{suffix}"


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
        raise ConfigError(f"resume: {resume!r} is not a checkpoint in {checkpoints}: give `latest` or the name "
                          "of a state folder there (e.g. state-step000200), not a path")
    path = Path(checkpoints) / resume
    if not (path / "trainer.json").is_file():
        raise ConfigError(f"resume: {resume!r} is not a checkpoint in {checkpoints} ({path} is not a training "
                          "state folder: no trainer.json); use `latest` or a state-stepNNNNNN folder from there")
    return path


def save_state(folder: Path, step: int, *, lora: dict, optimizer, scheduler, rng, trainer: dict,
               extras: dict | None = None) -> Path:
    """Write `state-step<step>` into `folder` (replacing one of the same step); returns its path."""
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / state_name(step)
    tmp = folder / f".{state_name(step)}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in lora.items()}, str(tmp / "lora.safetensors"))
        torch.save(optimizer.state_dict(), str(tmp / "optimizer.pt"))
        torch.save(scheduler.state_dict(), str(tmp / "scheduler.pt"))
        torch.save(rng, str(tmp / "rng.pt"))
        if extras:
            torch.save(extras, str(tmp / "extras.pt"))
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
    """A state's parts: `lora`, `optimizer`, `scheduler`, `rng`, `trainer`, `extras` ({} when it has
    none). A damaged state is one line naming it."""
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
            "extras": (torch.load(str(path / "extras.pt"), map_location="cpu", weights_only=True)
                       if (path / "extras.pt").is_file() else {}),
        }
    except Exception as exc:  # noqa: BLE001 - any damage means the same thing to the user
        raise ConfigError(f"resume: {path} cannot be read ({type(exc).__name__}: {str(exc)[:150]})") from None


def prune(folder: Path, keep: int, stem: str, spare: set[int] | frozenset[int] = frozenset()) -> None:
    """Keep the newest `keep` states and `<stem>-stepN` checkpoints (files or folders; 0 keeps
    everything), and the checkpoints of the steps in `spare` (the best one). Leftover temporaries of
    killed saves are removed too."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.name.startswith(".state-step") and path.name.endswith(".tmp"):
            shutil.rmtree(path, ignore_errors=True)
    remove_leftovers(folder, stem)
    if keep <= 0:
        return
    for _, path in list_states(folder)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    saved = []
    for path in folder.iterdir():
        match = CHECKPOINT.match(path.name)
        if match and not STATE_DIR.match(path.name):
            step = int(match.group("step"))
            if step not in spare and path.name in (checkpoint_name(stem, step, ".safetensors"),
                                                   checkpoint_name(stem, step, "")):
                saved.append((step, path))
    for _, path in sorted(saved)[:-keep]:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def rng_state(generator=None) -> dict:
    """This process's RNG: torch's (dropout masks), CUDA's, and a task's own generator if given."""
    import torch

    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_rng(state: dict, generator=None) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])
