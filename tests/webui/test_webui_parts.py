"""The tab's parts that need no browser: the form, the event view, the loss curve, the import bridge,
install.py and the exposure check (each WebUI part in a subprocess with the stand-in modules)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import venv

import pytest
from webui_env import FAKE_WEBUI, REPO

sys.path.insert(0, str(REPO / "extension_webui"))

from lora_daemon_webui import form, plot, watch  # noqa: E402


def form_values(tmp_path, advanced="", **fields):
    settings = dict(lora_rank=8, lora_alpha=16, batch_size=1, epochs=10, max_train_steps=0, learning_rate=2e-4,
                    seed=42, resolution=512, preset="none")
    host_fields = {k: fields.pop(k) for k in ("base_model", "dataset", "caption_source", "output_name") if k in fields}
    settings.update(fields)
    values = dict(base_model="/models/sd15.safetensors", dataset=str(tmp_path), caption_source=form.CAPTION_AUTO,
                  output_name="cat", settings=settings, advanced=advanced, deploy_dir="/webui/models/Lora",
                  base_dir=tmp_path)
    values.update(host_fields)
    return values


def test_the_form_becomes_a_config_and_the_advanced_yaml_adds_and_wins(tmp_path):
    config = form.build_config(**form_values(tmp_path, advanced="max_train_steps: 100\nlora_rank: 4\n",
                                             noise_offset=0.05, random_flip=False))
    assert config == {"base_model": "/models/sd15.safetensors", "train_data_dir": str(tmp_path), "output_name": "cat",
                      "lora_rank": 4, "lora_alpha": 16.0, "learning_rate": 2e-4, "epochs": 10, "batch_size": 1,
                      "seed": 42, "resolution": 512, "deploy_dir": "/webui/models/Lora", "max_train_steps": 100,
                      "noise_offset": 0.05}  # an advanced field is sent only when it is not its default
    assert isinstance(config["epochs"], int)
    csv = form.build_config(**form_values(tmp_path, caption_source=form.CAPTION_CSV, dataset="data"))
    assert csv["metadata_path"] == str(tmp_path / "data" / "metadata.csv")  # relative: the WebUI folder


def test_the_form_shows_what_the_declarations_say():
    from lora_daemon_webui.bridge import schema

    basic = {s.name: s for s in form.basic_settings()}
    assert list(basic) == [s.name for s in schema.TRAIN.values() if s.form.level == "basic" and "sd" in s.tasks]
    assert {"lora_rank", "learning_rate", "resolution"} <= set(basic)
    advanced = {s.name for s in form.advanced_settings()}
    # every SD setting has a field, the LLM-only ones none, and the keys the tab fills itself are not fields
    assert "noise_offset" in advanced and "max_seq_len" not in advanced and "base_model" not in advanced
    flux = [s.name for s in form.flux_settings()]
    assert [s.name for s in form.widget_settings()] == [*basic, *[s.name for s in form.advanced_settings()], *flux]
    # the Flux section: every Flux-only setting the tab can show, and the three files from the WebUI's folders
    assert {"fp8_base", "blocks_to_swap", "guidance_scale", "flux_lora_parts"} <= set(flux)
    assert not {"flux_ae", "noise_offset", "resolution"} & set(flux)
    assert [(s.name, s.form.widget) for s in form.model_file_settings()] == [
        ("flux_ae", "vae"), ("flux_clip_l", "text_encoder"), ("flux_t5xxl", "text_encoder")]
    assert form.field_info(basic["resolution"]).endswith("(at least 64 and at most 8192; a multiple of 8)")
    assert form.field_info(basic["max_train_steps"]).endswith("(0: not set; else at least 1 and at most 10,000,000)")


def test_flux_files_and_settings_are_sent_only_when_chosen(tmp_path):
    sd = form.build_config(**form_values(tmp_path, fp8_base="auto", blocks_to_swap="auto", guidance_scale=1.0,
                                         flux_lora_parts="img_attn, img_mlp, txt_attn, txt_mlp, single"),
                           model_files={"flux_ae": None, "flux_clip_l": "", "flux_t5xxl": None})
    assert not {k for k in sd if k.startswith(("flux", "fp8", "blocks", "guidance"))}  # an SD job gets none
    flux = form.build_config(**form_values(tmp_path, base_model="/models/flux1-dev.safetensors", fp8_base="true",
                                           blocks_to_swap="8", flux_lora_parts="img_attn, single"),
                             model_files={"flux_ae": "/m/VAE/ae.safetensors", "flux_clip_l": "/m/te/clip_l.safetensors",
                                          "flux_t5xxl": "/m/te/t5xxl_fp8_e4m3fn.safetensors"})
    assert {k: flux[k] for k in ("flux_ae", "flux_clip_l", "flux_t5xxl", "fp8_base", "blocks_to_swap",
                                 "flux_lora_parts")} == {
        "flux_ae": "/m/VAE/ae.safetensors", "flux_clip_l": "/m/te/clip_l.safetensors",
        "flux_t5xxl": "/m/te/t5xxl_fp8_e4m3fn.safetensors", "fp8_base": "true", "blocks_to_swap": "8",
        "flux_lora_parts": ["img_attn", "single"]}


def test_the_flux_files_come_from_the_webuis_vae_and_text_encoder_folders(tmp_path):
    """Forge lists models/VAE and models/text_encoder (and --vae-dir / --text-encoder-dir) in its
    VAE / Text Encoder menu; the tab offers the same files."""
    for folder, name in (("VAE", "ae.safetensors"), ("text_encoder", "clip_l.safetensors"),
                         ("text_encoder", "flux/t5xxl_fp16.safetensors"), ("text_encoder", "notes.txt")):
        (tmp_path / "models" / folder / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "models" / folder / name).write_bytes(b"x")
    out = run_python(sys.executable, f"""
        import json, sys
        sys.path[:0] = [{str(FAKE_WEBUI)!r}, {str(REPO / 'extension_webui')!r}]
        from lora_daemon_webui import host
        try:
            host.module_path("vae", "elsewhere.safetensors", "Autoencoder (ae)")
            unknown = "no error"
        except host.ModuleNotFound as exc:
            unknown = str(exc)
        print(json.dumps({{"vae": host.module_files("vae"), "te": sorted(host.module_files("text_encoder")),
                          "t5": host.module_path("text_encoder", "flux/t5xxl_fp16.safetensors", "T5-XXL"),
                          "typed": host.module_path("vae", "/elsewhere/ae.sft", "Autoencoder (ae)"),
                          "none": host.module_path("vae", "", "Autoencoder (ae)"), "unknown": unknown}}))
    """, cwd=tmp_path, env={"FAKE_WEBUI_ROOT": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["vae"] == {"ae.safetensors": str(tmp_path / "models" / "VAE" / "ae.safetensors")}
    assert seen["te"] == ["clip_l.safetensors", "flux/t5xxl_fp16.safetensors"]
    assert seen["t5"] == str(tmp_path / "models" / "text_encoder" / "flux" / "t5xxl_fp16.safetensors")
    assert seen["typed"] == "/elsewhere/ae.sft" and seen["none"] is None
    assert seen["unknown"].startswith("Autoencoder (ae): 'elsewhere.safetensors' is not in the WebUI's models/VAE")


@pytest.mark.parametrize("overrides, message", [
    (dict(dataset=" "), "Dataset folder: enter the folder"),
    (dict(base_model=None), "Base model: choose a checkpoint"),
    (dict(output_name="a/b"), "Output name: 'a/b' must be 1-100 ASCII letters"),
    (dict(lora_rank=2.5), "Rank: expected a whole number, got 2.5"),
    (dict(lora_rank=None), "Rank: enter a number"),
    (dict(lora_rank=5000), "Rank: must be at least 1 and at most 4096, got 5000"),
    (dict(learning_rate=0), "Learning rate: must be greater than 0 and at most 10, got 0"),
    (dict(resolution=32), "Resolution: must be at least 64 and at most 8192, got 32"),
    (dict(resolution=516), "Resolution: must be a multiple of 8, got 516"),
    (dict(noise_offset="lots"), "Noise offset: expected a number, got 'lots'"),
    (dict(advanced="a: [1,"), "Advanced settings line 1: not valid YAML"),
    (dict(advanced="- a\n- b"), "Advanced settings: expected `key: value` lines"),
])
def test_a_wrong_field_is_named_in_one_line(tmp_path, overrides, message):
    with pytest.raises(form.FormError) as err:
        form.build_config(**form_values(tmp_path, **overrides))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_txt_captions_refused_when_a_metadata_csv_would_win(tmp_path):
    (tmp_path / "metadata.csv").write_text("file,caption\n")
    with pytest.raises(form.FormError, match="Caption source: .*metadata.csv exists"):
        form.build_config(**form_values(tmp_path, caption_source=form.CAPTION_TXT))


def test_the_view_follows_a_jobs_events():
    view = watch.JobView("j1", name="cat")
    events = [("queued", {}), ("started", {"total": 3}),
              ("progress", {"step": 1, "total": 3, "loss": 0.5, "it_s": 2.0, "eta_s": 1.0}),
              ("progress", {"step": 2, "total": 3, "loss": 0.4, "it_s": 2.0, "eta_s": 0.5}),
              ("interrupted", {"reason": "daemon stopped"}), ("queued", {"resume": True}),
              ("started", {"total": 3, "attempt": 2}),
              ("progress", {"step": 3, "total": 3, "loss": 0.3, "it_s": 2.5, "eta_s": 0.0}),
              ("sample", {"step": 3, "paths": ["/s/1.png"]}),
              ("finished", {"lora_name": "cat_2", "steps": 3, "stopped_early": False})]
    lines = []
    for kind, data in events:
        view.apply({"kind": kind, "data": data})
        lines.append(watch.progress_line(view))
    assert lines[3] == "running · step 2/3 · loss 0.4000 · 2.00 it/s · ETA 0:00"
    assert view.losses == [(3, 0.3)]  # the re-run's curve starts again
    assert view.samples == ["/s/1.png"] and view.done and view.version == len(events)
    assert watch.lora_prompt(view.result) == "<lora:cat_2:0.8>"
    failed = watch.JobView("j2")
    failed.apply({"kind": "failed", "data": {"error": "x.safetensors: not a readable checkpoint"}})
    assert failed.done and failed.error.startswith("x.safetensors")
    assert watch.client.format_duration(3725) == "1:02:05" and watch.client.format_duration(None) == "?"


def test_the_view_shows_the_evaluations_scores_warnings_best_checkpoint_and_report():
    view = watch.JobView("j1", name="cat")
    message = "the LoRA barely changes the pictures (effect score 0.001, below verdict_min_effect 0.05): ..."
    for kind, data in [("started", {"total": 8}),
                       ("evaluation", {"step": 4, "scores": {"effect": 0.0012, "collapse": 0.98}, "final": False,
                                       "paths": ["/e/step000004.png", "/e/step000004-preview.png"]}),
                       ("verdict", {"step": 4, "verdict": "no_effect", "title": "no visible effect",
                                    "message": message, "checkpoint": ""})]:
        view.apply({"kind": kind, "data": data})
    assert view.samples == ["/e/step000004.png"]  # the grid (base beside the LoRA), not the preview as well
    live = watch.evidence(view)
    assert live.startswith(f"**Warning: no visible effect** (step 4): {message}")
    assert "Evaluation: effect 0.0012, collapse 0.98" in live and "Report" not in live
    verdict = {"step": 8, "verdict": "collapse", "title": "overfitting / collapse", "message": "alike",
               "checkpoint": "/c/cat-step000004.safetensors"}
    view.apply({"kind": "finished", "data": {"lora_name": "cat", "verdicts": [verdict], "report": "/o/report.html",
                                             "best_checkpoint": {"step": 4, "final": False, "by": "last without "
                                                                 "collapse"}}})
    done = watch.evidence(view).split("\n\n")
    assert done[0] == "**Warning: overfitting / collapse** (step 8): alike"  # the result's verdicts win
    assert done[2].startswith("Best checkpoint: step 4 (by last without collapse); **Deploy best checkpoint**")
    assert done[3].startswith("Report: `/o/report.html`")
    fine = watch.JobView("j2")
    fine.apply({"kind": "evaluation", "data": {"step": 8, "scores": {"effect": 0.5, "collapse": 1.1}}})
    fine.apply({"kind": "finished", "data": {"verdicts": [], "best_checkpoint": {"step": 8, "final": True}}})
    assert watch.evidence(fine) == "**No problem found.** Evaluation: effect 0.5, collapse 1.1"


def test_a_watch_whose_daemon_is_gone_says_so_and_still_runs_its_end_step():
    ended = []

    def connect():
        raise OSError("connection refused")

    w = watch.JobWatch(connect, "j1", on_end=ended.append).start()
    assert w.wait(10)
    assert w.view.state == "lost" and "connection refused" in w.view.error
    assert ended and ended[0].state == "lost"


def test_the_loss_curve_is_an_image_once_there_are_two_points():
    assert plot.loss_curve([(1, 0.5)]) is None
    image = plot.loss_curve([(i, 1.0 / i) for i in range(1, 5000)])
    assert image.size == (480, 220)
    # the smoothed line is drawn in its colour somewhere inside the axes
    assert any(image.getpixel((x, y)) == plot.SMOOTH for x in range(60, 470) for y in range(30, 190))
    assert plot.smooth([1.0, 0.0], weight=0.5) == [1.0, 0.5]


def run_python(python: str, code: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60, **kwargs)


def test_our_client_is_imported_beside_another_top_level_shared(tmp_path):
    (tmp_path / "shared.py").write_text("WHO = 'another extension'\n")
    out = run_python(sys.executable, f"""
        import sys
        sys.path[:0] = [{str(tmp_path)!r}, {str(REPO / 'extension_webui')!r}]
        sys.path = [p for p in sys.path if p not in ('', {str(REPO)!r})]
        import shared
        from lora_daemon_webui import bridge
        ours = sorted(m for m in sys.modules if m.split('.')[0] in ('shared', 'daemon'))
        print(sys.modules['shared'].WHO, '|', bridge.client.__file__, '|', bridge.launcher.__name__.split('.')[0]
              == bridge.host_import.package_name(bridge.REPO_ROOT), '|', ours, '|', {str(REPO)!r} in sys.path)
    """, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"another extension | {REPO / 'shared' / 'client.py'} | True | ['shared'] | False"


def test_install_py_installs_websockets_only_when_missing(tmp_path):
    bare = tmp_path / "bare"
    venv.EnvBuilder(with_pip=False).create(bare)  # a Python without websockets
    log = tmp_path / "calls.jsonl"
    env = {"PYTHONPATH": str(FAKE_WEBUI), "FAKE_WEBUI_LOG": str(log), "FAKE_WEBUI_PIP_DRY_RUN": "1"}
    installer = str(REPO / "extension_webui" / "install.py")
    out = subprocess.run([str(bare / "bin" / "python"), installer], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(c["call"], c["command"]) for c in calls] == [("run_pip", 'install "websockets>=11"')]
    log.unlink()
    out = subprocess.run([sys.executable, installer], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not log.exists()  # present: nothing is installed or upgraded


@pytest.mark.parametrize("args, refused", [([], False), (["--listen"], True), (["--share"], True),
                                           (["--server-name", "0.0.0.0"], True),
                                           (["--listen", "--gradio-auth", "me:secret"], False)])
def test_the_tab_refuses_to_train_for_strangers_when_the_webui_is_open_without_login(tmp_path, args, refused):
    out = run_python(sys.executable, f"""
        import sys
        sys.argv[1:] = {args!r}
        sys.path[:0] = [{str(FAKE_WEBUI)!r}, {str(REPO / 'extension_webui')!r}]
        from lora_daemon_webui import host
        print(host.exposed_without_login())
    """, cwd=tmp_path, env={"FAKE_WEBUI_ROOT": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(refused)


def test_auto_label_options_follow_the_caption_source(tmp_path):
    options = form.build_label_options(dataset="data", caption_source=form.CAPTION_TXT, clip_model=" ViT-B-32 ",
                                       clip_weights="", trigger=" sks ", base_dir=tmp_path)
    assert options == {"input_dir": str(tmp_path / "data"), "format": "txt", "model": "ViT-B-32", "trigger": "sks",
                       "field_names": form.LABEL_FIELD_NAMES}
    csv = form.build_label_options(dataset=str(tmp_path), caption_source=form.CAPTION_AUTO, clip_model=None,
                                   clip_weights="/w/clip.safetensors", trigger=None, base_dir=tmp_path)
    assert csv == {"input_dir": str(tmp_path), "format": "csv", "weights": "/w/clip.safetensors",
                   "field_names": form.LABEL_FIELD_NAMES}
    with pytest.raises(form.FormError, match="Dataset folder"):
        form.build_label_options(dataset="", caption_source=form.CAPTION_AUTO, clip_model=None, clip_weights=None,
                                 trigger=None, base_dir=tmp_path)


def test_the_eta_says_estimating_until_there_is_a_rate():
    from shared.reporting import Throughput

    rate, eta = Throughput(10).tick(1)  # the first step: nothing to measure a rate from
    assert (rate, eta) == (0.0, None)
    view = watch.JobView("j1")
    view.apply({"kind": "started", "data": {"total": 10}})
    view.apply({"kind": "progress", "data": {"step": 1, "total": 10, "loss": 0.5, "it_s": 0.0, "eta_s": None}})
    assert watch.progress_line(view) == "running · step 1/10 · loss 0.5000 · ETA estimating..."
    view.apply({"kind": "progress", "data": {"step": 2, "total": 10, "loss": 0.4, "it_s": 2.0, "eta_s": 4.0}})
    assert watch.progress_line(view).endswith("2.00 it/s · ETA 0:04")
    # a re-run that resumed keeps its curve up to where it continued; one that started again clears it
    view.apply({"kind": "started", "data": {"total": 10, "attempt": 2, "step": 1, "resumed": True}})
    assert view.losses == [(1, 0.5)] and watch.progress_line(view).endswith("ETA estimating...")


def test_a_checkpoint_title_from_before_the_webui_hashed_it_still_finds_the_file(tmp_path):
    """A1111 titles an unhashed checkpoint `name.safetensors` and retitles it `name.safetensors [hash]`
    when it loads it; a page built before that holds the old title."""
    models = tmp_path / "models" / "Stable-diffusion"
    models.mkdir(parents=True)
    (models / "mine.safetensors").write_bytes(b"weights" * 1000)
    out = run_python(sys.executable, f"""
        import json, sys
        sys.path[:0] = [{str(FAKE_WEBUI)!r}, {str(REPO / 'extension_webui')!r}]
        from modules import sd_models
        from lora_daemon_webui import host
        sd_models.list_models()
        before = host.default_checkpoint()
        sd_models.load_model()  # hashes it: the title changes
        after = host.checkpoint_titles()
        try:
            host.checkpoint_path("elsewhere.safetensors")
            unknown = "no error"
        except host.CheckpointNotFound as exc:
            unknown = str(exc)
        print(json.dumps({{"before": before, "after": after, "old": host.checkpoint_path(before),
                          "new": host.checkpoint_path(after[0]), "title": host.checkpoint_title(before),
                          "typed": host.checkpoint_path("/models/other.ckpt"), "unknown": unknown}}))
    """, cwd=tmp_path, env={"FAKE_WEBUI_ROOT": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    file = str(models / "mine.safetensors")
    assert seen["before"] == "mine.safetensors" and len(seen["after"]) == 1
    assert seen["after"][0].startswith("mine.safetensors [") and seen["title"] == seen["after"][0]
    assert seen["old"] == seen["new"] == file  # never `<webui>/mine.safetensors`
    assert seen["typed"] == "/models/other.ckpt"
    assert seen["unknown"].startswith("Base model: 'elsewhere.safetensors' is not one of the WebUI's checkpoints")


def test_the_tab_says_when_another_program_holds_the_daemon_port(tmp_path):
    import http.server
    import threading

    from webui_env import gradio3_python

    python = gradio3_python()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    state = tmp_path / "state"
    state.mkdir()
    (state / "config.yaml").write_text(f"port: {port}\n")
    (tmp_path / "config.json").write_text(json.dumps({"lora_daemon_state_dir": str(state),
                                                      "lora_daemon_python": sys.executable}))
    try:
        out = run_python(python, f"""
            import json, sys
            sys.path[:0] = [{str(FAKE_WEBUI)!r}, {str(REPO / 'extension_webui')!r}]
            from lora_daemon_webui import ui
            text, start = ui.check_daemon()
            after_start, start_again = ui.start_daemon()
            print(json.dumps({{"text": text, "start": start, "after": after_start, "again": start_again}}))
        """, cwd=tmp_path, env={"FAKE_WEBUI_ROOT": str(tmp_path), "HOME": str(tmp_path), "PATH": os.environ["PATH"],
                                "GRADIO_ANALYTICS_ENABLED": "False"})
    finally:
        server.shutdown()
        server.server_close()
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["text"].startswith("**The daemon's port is taken by another program:** port "
                                   f"{port} on 127.0.0.1 is taken by another program, not a lora-daemon")
    assert str(state / "config.yaml") in seen["text"] and "python -m daemon serve" not in seen["text"].split("(or")[0]
    assert seen["start"]["visible"] is False and seen["again"]["visible"] is False  # no Start that would fail
    assert seen["after"] == seen["text"] and not (state / "daemon.log").exists()


def test_a_finished_job_renders_the_lora_cards_for_pages_loaded_later(tmp_path):
    """With no page open when the job ends, the next page load must still get the new card: the
    WebUI's refresh handler (found in its real gradio 3 Blocks) is run, as a press of its button would."""
    from webui_env import gradio3_python

    python = gradio3_python()
    lora_dir = tmp_path / "models" / "Lora"
    lora_dir.mkdir(parents=True)
    out = run_python(python, f"""
        import json, sys
        sys.path[:0] = [{str(FAKE_WEBUI)!r}, {str(FAKE_WEBUI / 'extensions-builtin' / 'Lora')!r},
                        {str(REPO / 'extension_webui')!r}]
        import gradio as gr
        import networks, ui_extra_networks_lora
        from modules import shared, ui_extra_networks
        from lora_daemon_webui import host
        ui_extra_networks.register_page(ui_extra_networks_lora.ExtraNetworksPageLora())
        networks.list_available_networks()
        with gr.Blocks() as txt2img:
            ui = ui_extra_networks.create_ui(txt2img, [], "txt2img")
        with gr.Blocks() as demo:
            txt2img.render()
        shared.demo = demo
        ui.pages_contents = [p.create_html("txt2img") for p in ui.stored_extra_pages]  # the first page load
        before = ui.pages_contents[0]
        open({str(lora_dir / 'fresh.safetensors')!r}, "wb").close()  # the daemon deploys
        host.refresh_loras()
        print(json.dumps({{"before": before, "after": ui.pages_contents[0], "api": sorted(networks.available_networks)}}))
    """, cwd=tmp_path, env={"FAKE_WEBUI_ROOT": str(tmp_path), "PATH": os.environ["PATH"],
                            "GRADIO_ANALYTICS_ENABLED": "False"})
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["api"] == ["fresh"] and "data-name='fresh'" not in seen["before"]
    assert "data-name='fresh'" in seen["after"]  # what pages_html hands the next page load


def test_with_a_preset_the_fields_left_at_their_default_give_way(tmp_path):
    """The basic fields are always sent, except under a chosen preset: then a field still at its declared
    default is left out, so the preset's value applies; a changed field and the YAML box still win."""
    config = form.build_config(**form_values(tmp_path, preset="sdxl-character-12gb", lora_rank=64,
                                             advanced="batch_size: 2\n"))
    assert config["preset"] == "sdxl-character-12gb" and config["lora_rank"] == 64 and config["batch_size"] == 2
    assert not {"learning_rate", "resolution", "lora_alpha", "epochs"} & set(config)
    assert "preset" not in form.build_config(**form_values(tmp_path))  # "none": no key at all
