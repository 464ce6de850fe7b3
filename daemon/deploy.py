"""`deploy`: publish one saved checkpoint of a finished job into the job's deploy folders, instead of (beside)
its last adapter: the best checkpoint by default, as the evaluation named it.

The checkpoint must be one the job saved under its own `checkpoints/` folder (resolved, so a link cannot
lead elsewhere), and every folder it goes to is checked against the daemon's write roots again (the
daemon's config may have changed since the job ran). It lands as `<name>-stepNNNNNN` (or `_2`, ...:
nothing is overwritten, nothing appears half-written), with its header's name fields set to that name,
the job's `.json` notes saying which step it is, and the evaluation's picture of that step as its
preview. Runs in a thread of the daemon: no torch here (shared/lora_copy.py copies without it).
"""

from __future__ import annotations

import json
from pathlib import Path

from daemon.protocol import ProtocolError
from shared.lora_copy import copier, place_copy
from shared.roots import Roots, confine
from shared.schema.output import derived_name
from shared.training.state import CHECKPOINT, checkpoint_name


def job_folders(job: dict) -> tuple[Path, str, list[Path]]:
    """(output folder, the LoRA's name, the deploy folders) of a job, from its stored config."""
    spec = job.get("spec") or {}
    config = spec.get("config") or {}
    if not config.get("output_dir"):
        raise ProtocolError("bad_state", f"job {job['id']} is not a training job: it has no checkpoints", "job")
    folders = [Path(p) for p in [config.get("deploy_dir"), *(spec.get("deploy_dirs") or [])] if p]
    return Path(config["output_dir"]), derived_name(config["output_dir"], config.get("output_name")), folders


def saved_steps(checkpoints: Path, stem: str) -> list[int]:
    found = []
    if checkpoints.is_dir():
        for path in checkpoints.iterdir():
            match = CHECKPOINT.match(path.name)
            if match and match["stem"] == stem:
                found.append(int(match["step"]))
    return sorted(found)


def find_checkpoint(job: dict, step: int) -> Path:
    """The loadable checkpoint of `step` inside the job's own checkpoints folder."""
    output_dir, stem, _ = job_folders(job)
    checkpoints = (output_dir / "checkpoints").resolve()
    for suffix in (".safetensors", ""):
        candidate = checkpoints / checkpoint_name(stem, step, suffix)
        if candidate.exists() and candidate.resolve().parent == checkpoints:
            return candidate
    result = job.get("result") or {}
    if step == result.get("steps"):
        raise ProtocolError("bad_state", f"job {job['id']}: step {step} is its last step; that LoRA is already "
                            f"deployed ({', '.join(result.get('deployed') or []) or result.get('lora')})", "checkpoint")
    kept = saved_steps(checkpoints, stem)
    raise ProtocolError("bad_state", f"job {job['id']} has no checkpoint of step {step} in {checkpoints} (it keeps "
                        + (f"steps {', '.join(map(str, kept))}" if kept else "none: save_steps was 0, or the job "
                           "was stopped before its first save") + "; save_last_n keeps only the newest)",
                        "checkpoint")


def deploy_checkpoint(job: dict, step: int | None, roots: Roots) -> tuple[int, list[Path]]:
    """Publish the checkpoint of `step` (None: the job's best) into its deploy folders; returns the step and
    the paths written."""
    if job["state"] != "finished":
        raise ProtocolError("bad_state", f"job {job['id']} is {job['state']}; deploy a checkpoint of a finished job",
                            "job")
    result = job.get("result") or {}
    if step is None:
        best = result.get("best_checkpoint") or {}
        if best.get("step") is None:
            raise ProtocolError("bad_state", f"job {job['id']} names no best checkpoint (it ran without an "
                                "evaluation); give --checkpoint N", "checkpoint")
        step = int(best["step"])
    output_dir, stem, folders = job_folders(job)
    problem = confine(output_dir, roots.write, "output_dir", "write")
    if problem:
        raise ProtocolError("path_not_allowed", problem, "job")
    source = find_checkpoint(job, step)
    if not folders:
        raise ProtocolError("bad_state", f"job {job['id']} has no deploy folder (deploy_dir, or a host's Lora folder); "
                            f"the checkpoint is {source}", "job")
    for folder in folders:
        problem = confine(folder, roots.write, "deploy_dir", "write")
        if problem:
            raise ProtocolError("path_not_allowed", problem, "job")
    sidecars = None if source.is_dir() else _sidecars(result, output_dir, job["id"], step)
    name = source.name.removesuffix(".safetensors")
    return step, [place_copy(source, folder, name, sidecars) for folder in folders]


def _sidecars(result: dict, output_dir: Path, job_id: str, step: int) -> dict:
    """The finished LoRA's notes (saying which step this is) and the evaluation's picture of that step."""
    sidecars = {}
    lora = Path(result["lora"]) if result.get("lora") else None
    card = lora.with_name(lora.stem + ".json") if lora else None
    if card is not None and card.is_file():
        notes = json.loads(card.read_text(encoding="utf-8"))
        notes["notes"] = (f"The checkpoint of step {step} of {result.get('steps')} (lora-daemon job {job_id}). "
                          + str(notes.get("notes") or ""))

        def write(path: Path, name: str, notes=notes) -> None:
            Path(path).write_text(json.dumps(notes, indent=2), encoding="utf-8")

        sidecars[".json"] = write
    preview = output_dir / "evaluation" / f"step{step:06d}-preview.png"
    if preview.is_file():
        sidecars[".preview.png"] = copier(preview)
    return sidecars
