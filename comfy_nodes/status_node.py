"""The "LoRA job status" node: one daemon job's state as a line of text."""

from __future__ import annotations

from .daemon_job import DaemonError, TrainingFailed, connect


def describe(job: dict) -> str:
    """`<id> (<name>): <state>` plus what matters in that state: progress, the file, or the error."""
    head = f"{job['id']} ({job.get('name')}): {job['state']}"
    progress = job.get("progress") or {}
    result = job.get("result") or {}
    if job["state"] == "running" and progress:
        loss = progress.get("loss")
        head += f", step {progress.get('step')}/{progress.get('total')}"
        if loss is not None:
            head += f", loss {loss:.4f}"
    elif job["state"] == "finished" and result:
        where = ", ".join(result.get("deployed") or []) or result.get("lora")
        head += f", {result.get('steps')} steps" + (" (stopped early)" if result.get("stopped_early") else "")
        head += f" -> {where}"
        warnings = [v["title"] for v in result.get("verdicts") or []]
        if warnings:
            head += f"; warnings: {', '.join(warnings)}"
        if result.get("report"):
            head += f"; report: {result['report']}"
    elif job["state"] == "failed":
        head += f": {job.get('error')}"
    return head


class LoraJobStatus:
    DESCRIPTION = "Show a lora-daemon job's state (queued, running with its step and loss, finished, failed)."
    CATEGORY = "loaders/lora-daemon"
    FUNCTION = "status"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("status",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"job_id": ("STRING", {"default": "", "tooltip": "A daemon job id, e.g. from "
                                                   "Train LoRA's job_id output or `python -m daemon jobs`."})}}

    @classmethod
    def IS_CHANGED(cls, **inputs):
        return float("nan")  # a job's state changes without any input changing: always ask again

    def status(self, job_id: str):
        job_id = job_id.strip()
        if not job_id:
            text = "no job id (train a LoRA first, or paste one from `python -m daemon jobs`)"
        else:
            client = connect()
            try:
                text = describe(client.get(job_id))
            except DaemonError as exc:
                raise TrainingFailed(str(exc)) from None
            finally:
                client.close()
        return {"ui": {"text": [text]}, "result": (text,)}
