"""The ComfyUI node pack against a real daemon on the CPU, inside a stand-in ComfyUI host
(tests/comfy_standins: ComfyUI's module signatures and behaviour, recording what the nodes do)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
from comfy_host import ComfyHost
from daemon_harness import DaemonProcess, pid_alive, wait_until

from shared.fixtures.images import make_image_folder

TRAIN, STATUS = "LoraDaemonTrainLoRA", "LoraDaemonJobStatus"


@pytest.fixture
def daemon(tmp_path, tmp_path_factory, monkeypatch):
    proc = DaemonProcess(tmp_path / "state", [tmp_path_factory.getbasetemp()], [tmp_path]).start()
    monkeypatch.setenv("LORA_DAEMON_HOME", str(proc.state_dir))  # where the node finds the daemon
    yield proc
    proc.stop()


@pytest.fixture
def comfy(tmp_path, tiny_sd):
    host = ComfyHost(tmp_path / "ComfyUI").install()
    (host.checkpoints / "tiny-sd15.safetensors").symlink_to(tiny_sd["safetensors"])
    yield host
    host.uninstall()


def node_inputs(tiny_sd, dataset: Path, **overrides) -> dict:
    values = dict(checkpoint="tiny-sd15.safetensors", dataset_folder=str(dataset), caption_source="metadata.csv",
                  output_name="comfy_test", max_train_steps=4, epochs=1, lora_rank=4, lora_alpha=4.0,
                  learning_rate=1e-3, batch_size=2, resolution=64, training_seed=0,
                  # a tiny single-file model needs its component configs: an advanced setting
                  # and the evaluation's renders are left to the test that looks at them
                  advanced=f"model_config: {tiny_sd['config']}\nsave_steps: 0\nevaluation: false\n")
    values.update(overrides)
    return values


def lora_files(folder: Path) -> list[str]:
    """The LoRA files in a loras folder; anything else there must be one of their sidecars."""
    loras = sorted(p.name for p in folder.iterdir() if p.suffix == ".safetensors")
    stems = {name.removesuffix(".safetensors") for name in loras}
    others = [p.name for p in folder.iterdir() if p.suffix != ".safetensors"]
    assert all(name.removesuffix(".json").removesuffix(".preview.png") in stems for name in others), others
    return loras


def test_train_progress_deploy_reuse_and_new_name(daemon, comfy, tiny_sd, image_dir):
    train = comfy.pack.NODE_CLASS_MAPPINGS[TRAIN]
    assert "tiny-sd15.safetensors" in train.INPUT_TYPES()["required"]["checkpoint"][0]
    # the evaluation on (a few denoising steps a picture): its warnings and report reach the node
    args = node_inputs(tiny_sd, image_dir, advanced=f"model_config: {tiny_sd['config']}\nsave_steps: 0\n"
                       "sample_steps: 4\neval_sample_steps: 4\n")
    before = train.IS_CHANGED(**args, unique_id="7")

    model, clip, name, job_id, report = train().train(**args, unique_id="7")

    # VRAM freed before submitting; the bar followed the daemon's steps for this node
    assert comfy.mm.calls == ["unload_all_models", "soft_empty_cache"]
    assert comfy.progress == [(0, 4, "7")] + [(step, 4, "7") for step in range(1, 5)]
    events = [data for event, data, _ in comfy.server.messages if event == "lora_daemon.progress"]
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "queued" and kinds[-1] == "finished" and kinds.count("progress") == 4
    assert {e["job"] for e in events} == {job_id} and {e["node"] for e in events} == {"7"}
    # the node shows step, loss and ETA as text while it trains, and the LoRA's name after
    texts = [text for node, text in comfy.server.texts if node == "7"]
    assert texts[0].startswith("queued on the lora-daemon") and "ETA estimating..." in texts[1]
    assert any(t.startswith("step 4/4 · loss ") and " · ETA " in t for t in texts), texts
    # 4 steps at learning rate 1e-3 move the tiny model's pictures too little: the node says so, and where the
    # report is (its `report` output too)
    assert texts[-1] == (f"done: comfy_test.safetensors  (<lora:comfy_test:1>) · warning: no visible effect · "
                         f"report: {report}")
    assert any(t.startswith("warning at step 4: no visible effect") for t in texts), texts
    assert Path(report).name == "report.html" and "no visible effect" in Path(report).read_text()

    # the file landed in the loras folder under the returned name, complete, named as returned
    assert (model, clip) == (None, None)
    assert name == "comfy_test.safetensors" and lora_files(comfy.loras) == [name]
    from safetensors import safe_open

    with safe_open(str(comfy.loras / name), "pt") as fh:
        assert fh.metadata()["ss_output_name"] == "comfy_test"
        keys = sorted(fh.keys())
    with daemon.client() as client:
        assert client.get(job_id)["state"] == "finished"
    status = comfy.pack.NODE_CLASS_MAPPINGS[STATUS]().status(job_id)
    assert status["result"][0].startswith(f"{job_id} (comfy_test): finished, 4 steps -> ")
    assert str(comfy.loras / name) in status["result"][0]
    assert status["result"][0].endswith(f"; warnings: no visible effect; report: {report}")

    # IS_CHANGED reads the same after the training as before it: ComfyUI runs nothing again
    key = train.IS_CHANGED(**args, unique_id="7")
    assert before == key

    # an unchanged re-run (a restarted ComfyUI has no output cache) trains nothing and applies the
    # same file to the MODEL/CLIP passing through, the way LoraLoader does
    comfy.progress.clear()
    model, clip, again, again_job, again_report = train().train(**args, model="M", clip="C", strength_model=0.5,
                                                                strength_clip=0.7, unique_id="7")
    assert (again, again_job, again_report) == (name, job_id, report) and comfy.progress == []
    assert comfy.server.texts[-1] == ("7", "unchanged: reusing comfy_test.safetensors  (<lora:comfy_test:1>)")
    assert (model, clip) == (("patched", "M", 0.5), ("patched", "C", 0.7))
    applied = comfy.sd.applied[-1]
    assert applied["keys"] == keys and (applied["model"], applied["clip"]) == ("M", "C")
    with daemon.client() as client:
        assert [j["id"] for j in client.jobs()] == [job_id]

    # a changed input is a new key and a new file; the first file is untouched
    changed = dict(args, training_seed=1)
    assert train.IS_CHANGED(**changed) != key
    _, _, new_name, new_job, _ = train().train(**changed)
    assert new_name == "comfy_test_2.safetensors" and new_job != job_id
    assert lora_files(comfy.loras) == [name, new_name]
    assert train.IS_CHANGED(**changed) == train.IS_CHANGED(**changed)

    # changing the data set changes the key; a deleted LoRA reads as changed and would train again
    (image_dir / "extra.txt").write_text("notes")
    assert train.IS_CHANGED(**args) != key
    (image_dir / "extra.txt").unlink()
    trained = train.IS_CHANGED(**changed)
    (comfy.loras / new_name).unlink()
    assert train.IS_CHANGED(**changed) != trained


def queue_like_comfyui(node_class, inputs: dict, signatures: dict) -> bool:
    """One queued prompt as ComfyUI 0.3.64 treats this node (execution.py IsChangedCache, caching.py
    CacheKeySetInputSignature): the node's IS_CHANGED value is part of its cache signature, and the node
    (and everything after it) runs when the signature differs from the last run's. True when it ran."""
    signature = (tuple(sorted(inputs.items())), node_class.IS_CHANGED(**inputs))
    if signatures.get("last") == signature:
        return False
    node_class().train(**inputs)
    signatures["last"] = signature
    return True


def test_an_unchanged_workflow_trains_once_and_the_second_queue_is_instant(daemon, comfy, tiny_sd, image_dir):
    train = comfy.pack.NODE_CLASS_MAPPINGS[TRAIN]
    inputs = node_inputs(tiny_sd, image_dir, output_name="once", steps=2)
    signatures: dict = {}
    ran = [queue_like_comfyui(train, inputs, signatures) for _ in range(3)]
    assert ran == [True, False, False]  # the second queue is a cache hit, not only the third
    # the file is deleted: the next queue trains it again, and the one after is instant again
    for path in comfy.loras.glob("once.*"):
        path.unlink()
    assert [queue_like_comfyui(train, inputs, signatures) for _ in range(2)] == [True, False]
    assert lora_files(comfy.loras) == ["once.safetensors"]
    with daemon.client() as client:
        assert len(client.jobs()) == 2


def test_the_node_text_degrades_to_nothing_on_a_comfyui_without_progress_text(comfy, monkeypatch):
    server = type(comfy.server)
    monkeypatch.delattr(server, "send_progress_text")  # ComfyUI before 0.3.6x
    host = sys.modules[comfy.pack.__name__ + ".host"]
    host.progress_text("step 1/2", "7")  # no error, nothing sent
    assert comfy.server.texts == [] and not hasattr(comfy.server, "send_progress_text")


def test_cancel_in_comfyui_cancels_the_daemon_job_queued_or_running(daemon, comfy, tiny_sd, tmp_path):
    train = comfy.pack.NODE_CLASS_MAPPINGS[TRAIN]
    dataset = make_image_folder(tmp_path / "txt_images", count=4, captions="txt")
    args = node_inputs(tiny_sd, dataset, caption_source=".txt", max_train_steps=500, output_name="cancelled")

    def press_cancel_when(ready, what):
        def run():
            wait_until(ready, 120, what)
            comfy.mm.interrupt_current_processing(True)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    # queued behind another job: no events flow, and the node still notices the cancel
    with daemon.client() as client:
        blocker = client.submit({**node_inputs_config(tiny_sd, dataset), "output_name": "blocker"},
                                deploy_dirs=[str(tmp_path / "elsewhere")])
        wait_until(lambda: client.get(blocker["id"])["state"] == "running", 60, "the blocker to run")

    def node_queued():
        return any(d["kind"] == "queued" for e, d, _ in comfy.server.messages if e == "lora_daemon.progress")

    press_cancel_when(node_queued, "the node's job to be queued")
    with pytest.raises(comfy.mm.InterruptProcessingException):
        train().train(**args)
    queued_job = comfy.server.messages[0][1]["job"]
    with daemon.client() as client:
        assert client.get(queued_job)["state"] == "cancelled"
        assert client.get(blocker["id"])["state"] == "running"
        client.cancel(blocker["id"])

    # running: cancel arrives through a progress update, and the daemon kills the job's process
    comfy.server.messages.clear()
    pids = []

    def trained_two_steps():
        if not any(value >= 2 for value, _, _ in comfy.progress):
            return False
        with daemon.client() as client:
            pids.append(client.get(comfy.server.messages[0][1]["job"])["pid"])
        return True

    press_cancel_when(trained_two_steps, "two training steps")
    with pytest.raises(comfy.mm.InterruptProcessingException):
        train().train(**args)
    running_job = comfy.server.messages[0][1]["job"]
    with daemon.client() as client:
        assert client.get(running_job)["state"] == "cancelled"  # the node waited for the daemon to say so
    assert pids[0] and not pid_alive(pids[0])
    assert not comfy.mm.processing_interrupted()  # the flag was consumed, as ComfyUI expects
    assert lora_files(comfy.loras) == []  # cancel keeps nothing


def node_inputs_config(tiny_sd, dataset: Path) -> dict:
    """A long-running job submitted straight to the daemon (to keep the queue busy)."""
    return {"base_model": str(tiny_sd["safetensors"]), "model_config": str(tiny_sd["config"]),
            "train_data_dir": str(dataset), "resolution": 64, "max_train_steps": 5000, "save_steps": 0}


def test_daemon_errors_become_the_node_error(daemon, comfy, tiny_sd, image_dir):
    train = comfy.pack.NODE_CLASS_MAPPINGS[TRAIN]()

    # refused at submit: the daemon's config check, word for word
    with pytest.raises(Exception) as refused:
        train.train(**node_inputs(tiny_sd, image_dir, advanced="lerning_rate: 0.1\n"))
    assert str(refused.value) == ("ComfyUI Train LoRA node: unknown key 'lerning_rate' "
                                  "(did you mean 'learning_rate'?)")

    # a file that is no checkpoint: refused at submit from its header, before any job exists
    (comfy.checkpoints / "broken.safetensors").write_text("hello")
    with pytest.raises(Exception) as refused:
        train.train(**node_inputs(tiny_sd, image_dir, checkpoint="broken.safetensors"))
    assert str(refused.value) == (f"base_model: {comfy.checkpoints / 'broken.safetensors'}: not a readable "
                                  "checkpoint (no safetensors header)")

    # failed in the daemon's worker: the job's one-line error (a .ckpt is not read before training)
    (comfy.checkpoints / "broken.ckpt").write_text("hello")
    with pytest.raises(Exception) as failed:
        train.train(**node_inputs(tiny_sd, image_dir, checkpoint="broken.ckpt"))
    with daemon.client() as client:
        (job,) = client.jobs()
    assert job["state"] == "failed" and str(failed.value) == job["error"]
    assert "broken.ckpt: not a readable checkpoint" in job["error"]

    # the node's own checks name the input and what to do
    with pytest.raises(Exception, match=r"metadata.csv exists.*choose caption source metadata.csv"):
        train.train(**node_inputs(tiny_sd, image_dir, caption_source=".txt"))
    with pytest.raises(Exception, match="dataset_folder: .*nowhere is not a folder"):
        train.train(**node_inputs(tiny_sd, image_dir / "nowhere"))
    with pytest.raises(Exception, match="output_name: empty"):
        train.train(**node_inputs(tiny_sd, image_dir, output_name="  "))
    assert lora_files(comfy.loras) == []


def test_the_documented_workflow_wires_the_nodes_as_they_are_declared(comfy, tiny_sd):
    import json

    from comfy_host import REPO

    workflow = json.loads((REPO / "docs" / "comfyui_workflow_api.json").read_text())
    ours = comfy.pack.NODE_CLASS_MAPPINGS
    core_outputs = {"CheckpointLoaderSimple": ("MODEL", "CLIP", "VAE"), "CLIPTextEncode": ("CONDITIONING",),
                    "EmptyLatentImage": ("LATENT",), "KSampler": ("LATENT",), "VAEDecode": ("IMAGE",),
                    "SaveImage": ()}
    outputs = {nid: ours[n["class_type"]].RETURN_TYPES if n["class_type"] in ours else core_outputs[n["class_type"]]
               for nid, n in workflow.items()}
    chain = ["CheckpointLoaderSimple", "LoraDaemonTrainLoRA", "CLIPTextEncode", "KSampler", "VAEDecode",
             "SaveImage"]
    assert all(any(n["class_type"] == c for n in workflow.values()) for c in chain)
    for nid, node in workflow.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list):  # a link: [node id, output slot]
                assert value[0] in workflow and value[1] < len(outputs[value[0]]), (nid, name)
        if node["class_type"] in ours:
            declared = ours[node["class_type"]].INPUT_TYPES()
            assert set(declared["required"]) <= set(node["inputs"]), nid
            assert set(node["inputs"]) <= set(declared["required"]) | set(declared.get("optional", {})), nid
    train = workflow["2"]["inputs"]
    # the sampler gets the trained MODEL, the prompts the trained CLIP
    assert workflow["6"]["inputs"]["model"] == ["2", 0] and workflow["3"]["inputs"]["clip"] == ["2", 1]
    assert (train["model"], train["clip"]) == (["1", 0], ["1", 1])

    # the demo data set path works from a ComfyUI folder with the pack linked as custom_nodes/lora_daemon
    (comfy.checkpoints / train["checkpoint"]).symlink_to(tiny_sd["safetensors"])
    plan = comfy.pack.train_node.TrainPlan(**{k: v for k, v in train.items() if not isinstance(v, list)
                                              and k not in ("strength_model", "strength_clip")})
    assert plan.dataset == REPO / "shared" / "demo" / "images"
    assert plan.config["metadata_path"] == str(REPO / "shared" / "demo" / "images" / "metadata.csv")
    assert plan.deploy_dirs == [comfy.loras]


@pytest.mark.slow
def test_the_node_rides_out_a_daemon_restart(daemon, comfy, tiny_sd, image_dir):
    """The daemon dies mid-job and comes back: the node reconnects, resumes its subscription after the
    last event it saw, and returns the LoRA of the re-run job."""
    train = comfy.pack.NODE_CLASS_MAPPINGS[TRAIN]

    def restart_after_two_steps():
        wait_until(lambda: any(value >= 2 for value, _, _ in comfy.progress), 120, "two training steps")
        daemon.kill()
        daemon.start()

    thread = threading.Thread(target=restart_after_two_steps, daemon=True)
    thread.start()
    _, _, name, job_id, _ = train().train(**node_inputs(tiny_sd, image_dir, max_train_steps=16))
    thread.join(10)
    kinds = [d["kind"] for e, d, _ in comfy.server.messages if e == "lora_daemon.progress"]
    assert "interrupted" in kinds and kinds[-1] == "finished"
    assert kinds.count("started") == 2  # the daemon ran the job again after its restart
    seqs = [d for e, d, _ in comfy.server.messages if e == "lora_daemon.progress"]
    assert len(seqs) == len(kinds)
    assert lora_files(comfy.loras) == [name] == ["comfy_test.safetensors"]
    with daemon.client() as client:
        assert client.get(job_id)["state"] == "finished"


def test_auto_label_node_captions_the_folder_and_passes_it_on(daemon, comfy, tmp_path):
    from shared.fixtures.tiny_clip import build_tiny_clip
    from shared.images.dataset import scan_dataset

    clip_files = build_tiny_clip(tmp_path / "clip")
    images = make_image_folder(tmp_path / "to_label", count=3, captions="none")
    node = comfy.pack.NODE_CLASS_MAPPINGS["LoraDaemonAutoLabel"]
    assert comfy.pack.NODE_DISPLAY_NAME_MAPPINGS["LoraDaemonAutoLabel"] == "Auto-label dataset (lora-daemon)"
    folder, summary = node().label(str(images), "metadata.csv", str(clip_files["config"]),
                                   str(clip_files["weights"]), "shapes_style", False, unique_id="9")
    assert folder == str(images) and summary.startswith("labelled 3 images, kept 0 existing captions")
    assert comfy.progress[-1] == (3, 3, "9")
    scan = scan_dataset(images)  # what Train LoRA reads next
    assert scan.captioned == 3 and all(item.caption.startswith("shapes_style") for item in scan.items)
    # a second run keeps them
    _, again = node().label(str(images), "metadata.csv", str(clip_files["config"]), str(clip_files["weights"]),
                            "", False, unique_id="9")
    assert again.startswith("labelled 0 images, kept 3 existing captions")


def test_the_training_seed_stays_fixed_in_the_comfyui_frontend(comfy):
    """ComfyUI's frontend adds a "control after generate" widget, set to randomize, to every INT input
    named `seed` or `noise_seed` (Comfy-Org/ComfyUI_frontend, useIntWidget.ts:
    `inputSpec.control_after_generate ?? ['seed', 'noise_seed'].includes(inputSpec.name)`; and
    litegraphUtil.ts's migrateWidgetsValues counts that extra widget for those names even when
    `control_after_generate` is false). A seed randomized after each Run changes the node's inputs, so
    every Run would train another LoRA. So no INT input of ours has those names or asks for the control,
    and the training seed is an input with the declared default that nothing changes."""
    required = comfy.pack.NODE_CLASS_MAPPINGS[TRAIN].INPUT_TYPES()["required"]
    ints = {name: options for name, (kind, options) in required.items() if kind == "INT"}
    assert not set(ints) & {"seed", "noise_seed"}
    assert not any(options.get("control_after_generate") for options in ints.values())
    from shared import schema

    seed = ints["training_seed"]
    declared = schema.TRAIN["seed"]
    assert (seed["default"], seed["min"], seed["max"]) == (declared.default, declared.minimum, declared.maximum)
    # the other inputs carry their declarations too: the node and the config share one rule
    rank, lr = required["lora_rank"], required["learning_rate"]
    assert rank == ("INT", {"tooltip": "LoRA rank (network dim). (at least 1 and at most 4096)", "default": 8,
                            "max": 4096, "min": 1, "step": 1})
    assert lr[1]["default"] == 2e-4 and lr[1]["max"] == 10 and lr[1]["round"] is False  # 10: Prodigy's multiplier
    assert required["max_train_steps"][1]["min"] == 0 and required["resolution"][1]["step"] == 8


def test_the_auto_label_nodes_errors_name_its_inputs(comfy, tmp_path, tmp_path_factory, monkeypatch):
    """No CLIP weights on this machine: the message names the node's clip_weights and clip_model inputs,
    not the CLI's --weights and --model."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))  # the daemon's workers find no weights
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty_cache"))
    proc = DaemonProcess(tmp_path / "state", [tmp_path_factory.getbasetemp()], [tmp_path]).start()
    monkeypatch.setenv("LORA_DAEMON_HOME", str(proc.state_dir))
    images = make_image_folder(tmp_path / "to_label", count=1, captions="none")
    node = comfy.pack.NODE_CLASS_MAPPINGS["LoraDaemonAutoLabel"]
    try:
        with pytest.raises(Exception) as err:
            node().label(str(images), "metadata.csv", "ViT-B-32", "", "", False, unique_id="9")
    finally:
        proc.stop()
    message = str(err.value)
    assert "no open_clip weights for ViT-B-32" in message
    assert "set clip_weights to /path/to/open_clip_model.safetensors (a checkpoint for clip_model ViT-B-32)" in message
    assert "--weights" not in message and "--model" not in message


def test_the_node_offers_the_presets_and_its_defaults_give_way_to_one(comfy):
    required = comfy.pack.NODE_CLASS_MAPPINGS[TRAIN].INPUT_TYPES()["required"]
    choices, options = required["preset"]
    assert choices[0] == "none" and options["default"] == "none" and "sdxl-character-12gb" in choices
    assert list(required)[-1] == "preset"  # the last widget: saved workflows keep their other widgets' places
    inputs = sys.modules[comfy.pack.__name__ + ".inputs"]
    widgets = {name: options.get("default") for name, (_, options) in required.items()
               if name not in ("checkpoint", "dataset_folder", "caption_source", "output_name")}
    assert "learning_rate" in inputs.config_values(widgets) and "preset" not in inputs.config_values(widgets)
    chosen = inputs.config_values({**widgets, "preset": "sd15-style-8gb", "lora_rank": 4})
    assert chosen == {"preset": "sd15-style-8gb", "lora_rank": 4}  # the rest at their defaults: the preset's apply


FLUX_TRAIN = "LoraDaemonTrainFluxLoRA"


def place_flux_files(comfy, tiny_flux, legacy: bool = False) -> None:
    """The tiny Flux where a ComfyUI Flux workflow's loaders find it: the transformer in diffusion_models
    (older: unet), ae in vae, CLIP-L and T5 in text_encoders (older: clip), ComfyUI's T5 tokenizer in
    comfy/text_encoders."""
    import shutil

    models = comfy.models
    transformer = models / ("unet" if legacy else "diffusion_models") / "flux" / "tiny-flux1-dev.safetensors"
    transformer.parent.mkdir(parents=True)
    shutil.copy(tiny_flux["transformer"], transformer)  # a copy: the tokenizer is found from where it lies
    (models / "vae" / "ae.safetensors").symlink_to(tiny_flux["ae"])
    encoders = models / ("clip" if legacy else "text_encoders")
    (encoders / "clip_l.safetensors").symlink_to(tiny_flux["clip_l"])
    (encoders / "t5xxl_fp16.safetensors").symlink_to(tiny_flux["t5xxl"])
    tokenizer = comfy.base / "comfy" / "text_encoders" / "t5_tokenizer"
    if not tokenizer.exists():
        shutil.copytree(tiny_flux["t5_tokenizer"], tokenizer)


def flux_node_inputs(tiny_flux, dataset: Path, **overrides) -> dict:
    cache = dataset.parent / "flux-cache"  # not the user's ~/.cache
    values = dict(transformer="flux/tiny-flux1-dev.safetensors", flux_ae="ae.safetensors",
                  flux_clip_l="clip_l.safetensors", flux_t5xxl="t5xxl_fp16.safetensors", dataset_folder=str(dataset),
                  caption_source="metadata.csv", output_name="comfy_flux", max_train_steps=2, epochs=1, lora_rank=4,
                  lora_alpha=4.0, learning_rate=1e-3, batch_size=2, resolution=64, training_seed=0,
                  fp8_base="auto", blocks_to_swap="auto",
                  advanced=f"model_config: {tiny_flux['model_config']}\nsave_steps: 0\nt5_max_length: 16\n"
                           f"preview: false\ncache_dir: {cache}\n")
    values.update(overrides)
    return values


def test_train_flux_lora_from_comfyuis_own_folders(daemon, comfy, tiny_flux, image_dir):
    place_flux_files(comfy, tiny_flux)
    train = comfy.pack.NODE_CLASS_MAPPINGS[FLUX_TRAIN]
    assert comfy.pack.NODE_DISPLAY_NAME_MAPPINGS[FLUX_TRAIN] == "Train Flux LoRA (lora-daemon)"
    required = train.INPUT_TYPES()["required"]
    assert required["transformer"][0] == ["flux/tiny-flux1-dev.safetensors"]
    assert required["flux_ae"][0] == ["ae.safetensors"]
    assert required["flux_clip_l"][0] == required["flux_t5xxl"][0] == ["clip_l.safetensors", "t5xxl_fp16.safetensors"]
    assert required["fp8_base"][0] == ["auto", "true", "false"] and "blocks_to_swap" in required  # Flux's basic ones
    assert "checkpoint" not in required and "noise_offset" not in required
    args = flux_node_inputs(tiny_flux, image_dir)
    before = train.IS_CHANGED(**args, unique_id="9")

    model, clip, name, job_id, report = train().train(**args, unique_id="9")

    assert name == "comfy_flux.safetensors" and lora_files(comfy.loras) == [name]
    assert Path(report).name == "report.html" and Path(report).is_file()  # a Flux job has its report too
    from safetensors import safe_open

    with safe_open(str(comfy.loras / name), "pt") as fh:
        meta, keys = fh.metadata(), set(fh.keys())
    assert meta["modelspec.architecture"] == "flux-1-dev/lora" and meta["ss_output_name"] == "comfy_flux"
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    with daemon.client() as client:
        job = client.get(job_id)
    stored = job["spec"]["config"]
    assert job["state"] == "finished" and job["task"] == "flux" and stored["task"] == "flux"
    assert stored["flux_t5xxl"] == str((comfy.models / "text_encoders" / "t5xxl_fp16.safetensors").resolve())
    assert stored["t5_tokenizer"] == str(comfy.base / "comfy" / "text_encoders" / "t5_tokenizer")
    assert train.IS_CHANGED(**args, unique_id="9") == before  # ComfyUI runs nothing again
    assert train.IS_CHANGED(**dict(args, flux_t5xxl="clip_l.safetensors")) != before  # another file, another LoRA
    comfy.progress.clear()
    _, _, again, again_job, _ = train().train(**args, unique_id="9")
    assert (again, again_job) == (name, job_id) and comfy.progress == []


def test_an_older_comfyui_with_unet_and_clip_folders_lists_the_flux_files(comfy, tiny_flux, image_dir):
    comfy.folder_paths.configure(str(comfy.base), legacy=True)
    assert "diffusion_models" not in comfy.folder_paths.folder_names_and_paths
    place_flux_files(comfy, tiny_flux, legacy=True)
    train = comfy.pack.NODE_CLASS_MAPPINGS[FLUX_TRAIN]
    required = train.INPUT_TYPES()["required"]
    assert required["transformer"][0] == ["flux/tiny-flux1-dev.safetensors"]
    assert required["flux_t5xxl"][0] == ["clip_l.safetensors", "t5xxl_fp16.safetensors"]
    plan = comfy.pack.train_node.FluxTrainPlan(**flux_node_inputs(tiny_flux, image_dir))
    assert plan.config["base_model"] == str((comfy.models / "unet" / "flux" / "tiny-flux1-dev.safetensors").resolve())
    assert plan.config["flux_clip_l"] == str(tiny_flux["clip_l"].resolve())
    with pytest.raises(FileNotFoundError, match=r"flux_ae: 'missing.safetensors' is not in ComfyUI's vae folders"):
        comfy.pack.train_node.FluxTrainPlan(**dict(flux_node_inputs(tiny_flux, image_dir), flux_ae="missing.safetensors"))
