"""The "Train LoRA" node: train on the daemon, deploy into ComfyUI's loras folder, optionally apply
the new LoRA to the MODEL/CLIP passing through, so one workflow can train and then sample."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from . import host, inputs, thin
from .daemon_job import DaemonError, TrainingFailed, connect, run_job
from .train_cache import TrainCache, cache_key
from .wildcard import ANY

log = logging.getLogger("lora_daemon.comfy")

CAPTION_SOURCES = ["metadata.csv", ".txt"]
# Which adapter the node hands on: the job's last one, or the best checkpoint its evaluation named
# (placed in the loras folder beside the last; the same as the last when that is the best).
USE_CHECKPOINT = ["last", "best"]
PROGRESS_EVENT = "lora_daemon.progress"


def parse_advanced(text: str) -> dict:
    """The advanced settings: YAML `key: value` lines (any config key; the daemon validates them)."""
    if not text or not text.strip():
        return {}
    try:
        import yaml  # ComfyUI itself requires pyyaml
    except ImportError:  # pragma: no cover - only outside ComfyUI
        try:
            data = json.loads(text)
        except ValueError:
            raise TrainingFailed("advanced settings: pyyaml is not installed here; write them as JSON") from None
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise TrainingFailed(f"advanced settings:{where} not valid YAML "
                                 f"({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TrainingFailed(f"advanced settings: expected `key: value` lines, got a {type(data).__name__}")
    return data


class TrainPlan:
    """What one set of node inputs means: the daemon config, where the file goes, and its cache key."""

    task = thin.schema.SD
    INPUTS = ("checkpoint", "dataset_folder", "caption_source", "output_name", "advanced", "use_checkpoint")

    def __init__(self, checkpoint, dataset_folder, caption_source, output_name, advanced="", use_checkpoint="last",
                 **settings):
        self._plan(host.checkpoint_path(checkpoint), {}, dataset_folder, caption_source, output_name, advanced,
                   use_checkpoint, settings)

    def _plan(self, base_model: Path, model_files: dict[str, Path], dataset_folder, caption_source, output_name,
              advanced, use_checkpoint, settings) -> None:
        self.checkpoint = base_model
        self.model_files = model_files
        self.base_dir = host.base_path()
        if not str(dataset_folder).strip():
            raise TrainingFailed("dataset_folder: empty; give the folder of training images")
        dataset = Path(str(dataset_folder).strip()).expanduser()
        self.dataset = (dataset if dataset.is_absolute() else self.base_dir / dataset).resolve()
        if not self.dataset.is_dir():
            raise TrainingFailed(f"dataset_folder: {self.dataset} is not a folder")
        if not str(output_name).strip():
            raise TrainingFailed("output_name: empty; give the LoRA a file name (letters, digits, _ and -)")
        self.lora_folder = host.first_lora_folder()
        overrides = parse_advanced(advanced)

        config = {
            "base_model": str(self.checkpoint),
            **{key: str(path) for key, path in model_files.items()},
            "train_data_dir": str(self.dataset),
            "output_name": str(output_name).strip(),
            **inputs.config_values(settings, self.task),
        }
        csv = self.dataset / "metadata.csv"
        if caption_source == "metadata.csv":
            config["metadata_path"] = str(csv)
        elif caption_source == ".txt":
            if csv.is_file() and "metadata_path" not in overrides:
                raise TrainingFailed(f"{csv} exists, and the trainer reads captions from it when present: choose "
                                     "caption source metadata.csv, or move that file away to use the .txt captions")
        else:
            raise TrainingFailed(f"caption_source: {caption_source!r} is not one of {', '.join(CAPTION_SOURCES)}")
        config.update(overrides)
        self.config = config

        # deploy into ComfyUI's first loras folder, unless the config's own deploy_dir already is that folder
        deploy_dir = overrides.get("deploy_dir")
        same = deploy_dir and (self.base_dir / Path(str(deploy_dir)).expanduser()).resolve() == self.lora_folder
        self.deploy_dirs = [] if same else [self.lora_folder]
        if use_checkpoint not in USE_CHECKPOINT:
            raise TrainingFailed(f"use_checkpoint: {use_checkpoint!r} is not one of {', '.join(USE_CHECKPOINT)}")
        self.use_best = use_checkpoint == "best"
        settings_key = {"config": config, "lora_folder": str(self.lora_folder)}
        if self.use_best:  # "last" keeps the keys of LoRAs trained before the input existed
            settings_key["use_checkpoint"] = use_checkpoint
        self.key = cache_key(settings_key, self.checkpoint, self.dataset, model_files)

    def lora_file(self, result: dict) -> Path:
        """The deployed copy that landed in the loras folder (its name may have a _2, _3 suffix)."""
        return self.in_lora_folder(result.get("deployed") or [], result)

    def in_lora_folder(self, paths: list[str], result: dict) -> Path:
        for path in paths:
            if Path(path).resolve().parent == self.lora_folder:
                return self.lora_folder / Path(path).name
        raise TrainingFailed(f"job {result.get('job')} finished but placed no file in {self.lora_folder}")


class FluxTrainPlan(TrainPlan):
    """A Flux job from ComfyUI's own folders: the transformer from diffusion_models (older: unet), the
    autoencoder from vae, CLIP-L and T5 from text_encoders (older: clip)."""

    task = thin.schema.FLUX
    INPUTS = ("transformer", *(s.name for s in inputs.model_file_settings(thin.schema.FLUX)), *TrainPlan.INPUTS[1:])

    def __init__(self, transformer, dataset_folder, caption_source, output_name, advanced="", use_checkpoint="last",
                 **values):
        files = inputs.model_files(values, self.task)
        settings = {k: v for k, v in values.items() if k not in files}
        self._plan(host.model_path("diffusion_model", transformer, "transformer"), files, dataset_folder,
                   caption_source, output_name, advanced, use_checkpoint, settings)


class TrainLora:
    DESCRIPTION = ("Train a LoRA on the lora-daemon (started if not running) and place it in ComfyUI's "
                   "first loras folder. Unchanged inputs and data reuse the LoRA trained before. A Flux "
                   "all-in-one checkpoint trains here too; for the separate Flux files use Train Flux LoRA.")
    PLAN = TrainPlan
    CATEGORY = "loaders/lora-daemon"
    FUNCTION = "train"
    OUTPUT_NODE = True
    RETURN_TYPES = ("MODEL", "CLIP", ANY, "STRING", "STRING")
    RETURN_NAMES = ("model", "clip", "lora_name", "job_id", "report")
    OUTPUT_TOOLTIPS = (
        "The connected model with the new LoRA applied (None when no model is connected).",
        "The connected CLIP with the new LoRA applied (None when no CLIP is connected).",
        "The LoRA's file name in the loras folder: connect it to a LoraLoader's lora_name.",
        "The daemon job id (feed it to 'LoRA job status'); a reused LoRA gives the job that trained it.",
        "The job's report.html (loss curves, the evaluation's pictures, scores and warnings): open it in a browser.",
    )

    @classmethod
    def model_inputs(cls) -> dict:
        return {"checkpoint": (host.checkpoint_names(), {"tooltip": "The base model to train on."})}

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **cls.model_inputs(),
                "dataset_folder": ("STRING", {"default": "", "tooltip": "Folder of training images with "
                                   "captions; relative paths are read from ComfyUI's folder."}),
                "caption_source": (CAPTION_SOURCES, {"default": "metadata.csv", "tooltip":
                                   "metadata.csv (file,caption rows) or one .txt caption beside each image."}),
                "output_name": ("STRING", {"default": "my_lora", "tooltip": "File name of the LoRA; "
                                "an existing file is never overwritten (name_2, name_3, ... instead)."}),
                **inputs.inputs(cls.PLAN.task),  # the basic settings, generated from their declarations
            },
            "optional": {
                "model": ("MODEL", {"tooltip": "Comes out with the new LoRA applied."}),
                "clip": ("CLIP", {"tooltip": "Comes out with the new LoRA applied."}),
                "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}),
                "strength_clip": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}),
                "advanced": ("STRING", {"default": "", "multiline": True, "tooltip": "YAML `key: value` "
                             "lines overriding any training config key (see docs/config.md)."}),
                "use_checkpoint": (USE_CHECKPOINT, {"default": "last", "tooltip": "last: the LoRA of the last "
                                   "step. best: the checkpoint the trainer's evaluation found best (lowest eval "
                                   "loss, else the last without a collapse warning), placed beside it."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, **values):
        """The cache key and its generation: the same value means the same LoRA. ComfyUI puts this
        value into the node's cache signature, so it must not change when the first training stores
        its result (that made the second queue of an unchanged workflow run everything after this
        node again); a deleted file moves the generation, so the next queue trains it again."""
        plan = cls.PLAN(**_plan_inputs(values, cls.PLAN))
        return f"{plan.key}:{TrainCache().generation(plan.key)}"

    def train(self, model=None, clip=None, strength_model=1.0, strength_clip=1.0, unique_id=None, **values):
        plan = self.PLAN(**_plan_inputs(values, self.PLAN))
        cache = TrainCache()
        cached = cache.lookup(plan.key)
        if cached:
            log.info("lora-daemon: inputs and data unchanged, reusing %s", cached["path"])
            path, job_id, report = Path(cached["path"]), cached.get("job", ""), cached.get("report") or ""
            host.progress_text(f"unchanged: reusing {path.name}  (<lora:{path.stem}:1>)", unique_id)
        else:
            generation = cache.generation(plan.key)  # what IS_CHANGED returned for this run
            path, job_id, result = self._train(plan, unique_id)
            report = result.get("report") or ""
            cache.store(plan.key, {"path": str(path), "lora_name": path.name, "job": job_id, "report": report,
                                   "created_at": time.time(), "generation": generation})
            host.progress_text(" · ".join([f"done: {path.name}  (<lora:{path.stem}:1>)", *evidence(result)]),
                               unique_id)
        if model is not None or clip is not None:
            model, clip = host.apply_lora(model, clip, path, strength_model, strength_clip)
        return (model, clip, path.relative_to(plan.lora_folder).as_posix(), job_id, report)

    def _train(self, plan: TrainPlan, node_id: str | None) -> tuple[Path, str, dict]:
        client = connect()
        try:
            host.free_vram()
            steps = plan.config.get("max_train_steps") or 1
            bar = host.progress_bar(steps, node_id)
            job_id = ""

            def submitted(job: dict) -> None:
                nonlocal job_id
                job_id = job["id"]
                log.info("lora-daemon: job %s queued", job_id)

            def on_event(event: dict) -> None:
                data = event.get("data") or {}
                host.send_event(PROGRESS_EVENT, {"node": node_id, "job": job_id, "kind": event["kind"], **data})
                text = progress_text(event["kind"], data)
                if text:
                    host.progress_text(text, node_id)
                if event["kind"] == "progress":
                    bar.update_absolute(data["step"], data["total"])
                elif event["kind"] == "started":
                    bar.update_absolute(0, data.get("total") or steps)

            result = run_job(client, plan.config, base_dir=plan.base_dir, deploy_dirs=plan.deploy_dirs,
                             on_submitted=submitted, on_event=on_event)
            path = plan.lora_file(result)
            best = result.get("best_checkpoint") or {}
            if plan.use_best and best and not best.get("final"):
                try:
                    placed = client.deploy(job_id, best["step"])
                except DaemonError as exc:
                    raise TrainingFailed(f"use_checkpoint best: {exc}") from None
                path = plan.in_lora_folder(placed["paths"], result)
                log.info("lora-daemon: job %s: using the checkpoint of step %s", job_id, placed["step"])
        finally:
            client.close()
        log.info("lora-daemon: job %s finished: %s", job_id, path)
        return path, job_id, result


def evidence(result: dict) -> list[str]:
    """The evaluation's conclusions as short parts of the node's text: warnings, best checkpoint, report."""
    parts = [f"warning: {v['title']}" for v in result.get("verdicts") or []]
    best = result.get("best_checkpoint") or {}
    if best and not best.get("final"):
        parts.append(f"best checkpoint: step {best['step']}")
    if result.get("report"):
        parts.append(f"report: {result['report']}")
    return parts


class TrainFluxLora(TrainLora):
    """Flux.1 from the files a ComfyUI Flux workflow loads (UNETLoader, DualCLIPLoader, VAELoader): one combo
    per file, from ComfyUI's own folders, so none can be left out."""

    DESCRIPTION = ("Train a Flux.1 (dev or schnell) LoRA on the lora-daemon from the transformer in "
                   "diffusion_models (or unet), ae in vae, and CLIP-L and T5 in text_encoders (or clip); the LoRA "
                   "lands in ComfyUI's first loras folder (load it with LoraLoaderModelOnly, or LoraLoader when "
                   "CLIP-L was trained). Unchanged inputs and data reuse the LoRA trained before.")
    PLAN = FluxTrainPlan

    @classmethod
    def model_inputs(cls) -> dict:
        return {
            "transformer": (host.model_names("diffusion_model"), {"tooltip": "The Flux transformer "
                            "(flux1-dev or flux1-schnell, bf16 or fp8), as UNETLoader loads it."}),
            **inputs.model_file_inputs(cls.PLAN.task),  # flux_ae, flux_clip_l, flux_t5xxl from their declarations
        }


def progress_text(kind: str, data: dict) -> str | None:
    """What the node shows as text for a daemon event: `step 3/500 · loss 0.1234 · ETA 1:23`."""
    if kind == "queued":
        return "queued on the lora-daemon" + (f" (position {data['position']})" if data.get("position") else "")
    if kind == "started":
        resumed = f", resumed at step {data.get('step')}" if data.get("resumed") else ""
        return f"training: {data.get('total')} steps{resumed} · ETA estimating..."
    if kind == "progress":
        loss = f" · loss {data['loss']:.4f}" if isinstance(data.get("loss"), (int, float)) else ""
        return f"step {data.get('step')}/{data.get('total')}{loss} · {thin.client.eta_text(data.get('it_s'), data.get('eta_s'))}"
    if kind == "stopping":
        return "stopping: saving what was trained ..."
    if kind == "interrupted":
        return "interrupted (the daemon stopped); it runs again when the daemon is back"
    if kind == "verdict":
        return f"warning at step {data.get('step')}: {data.get('title')}"
    return None


def _plan_inputs(values: dict, plan: type[TrainPlan] = TrainPlan) -> dict:
    """The node inputs that shape the LoRA (ComfyUI may also pass hidden and passthrough inputs)."""
    names = (*plan.INPUTS, *(inputs.input_name(s) for s in inputs.basic_settings(plan.task)))
    return {k: values[k] for k in names if k in values}
