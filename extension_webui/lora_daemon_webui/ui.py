"""The "Train LoRA" tab, written against the part of gradio that 3.41 (AUTOMATIC1111) and 4.40 (Forge)
share: no `_js`/`js`, no `Component.update()` (only `gr.update`), no `gr.Box`, no `gr.Timer`, and no
keyword that either version lacks. Live progress comes from generator handlers (Train, Refresh) that
yield a new view whenever the job's watch changes; Stop and Cancel run outside the queue so they
answer while such a handler is streaming.
"""

from __future__ import annotations

import html
import os
import time

import gradio as gr

from . import form, host
from .bridge import REPO_ROOT, launcher
from .bridge import client as client_mod
from .bridge import schema as client_schema
from .plot import loss_curve
from .watch import JobView, JobWatch, Watches, evidence, lora_prompt, progress_line, wait_for_change

DaemonError, DaemonUnavailable, PortTaken = client_mod.DaemonError, client_mod.DaemonUnavailable, client_mod.PortTaken

WATCHES = Watches()
QUEUE_REFRESH_S = 2.0
MIN_FRAME_S = 0.5  # the fastest the live view redraws: a tiny model steps many times a second
MAX_SAMPLES = 8
NOT_ALLOWED = ("**Not allowed:** this WebUI is reachable from other machines without a login, so the Train LoRA tab does "
               "not start or control jobs. Start the WebUI with `--gradio-auth`, or allow it under "
               "Settings > LoRA daemon.")


# --- the daemon ----------------------------------------------------------------------------------


def _connect(settings: host.TabSettings, timeout: float = 10.0):
    return client_mod.DaemonClient.connect(settings.state_dir, host=settings.host, port=settings.port,
                                           timeout=timeout)


def _where(settings: host.TabSettings) -> str:
    state = settings.state_dir or client_mod.default_state_dir()
    known_host, known_port = client_mod.read_endpoint(state)
    return f"{settings.host or known_host}:{settings.port or known_port}"


def _daemon_python(settings: host.TabSettings) -> str | None:
    """The setting, else what the launcher finds itself ($LORA_DAEMON_PYTHON, install.json), else the
    environment `python3 install.py` makes in this checkout (./.venv)."""
    if settings.python:
        return settings.python
    state = settings.state_dir or client_mod.default_state_dir()
    if os.environ.get("LORA_DAEMON_PYTHON") or launcher.recorded_python(state):
        return None
    candidate = REPO_ROOT / ".venv" / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    return str(candidate) if candidate.exists() else None


def _status(settings: host.TabSettings) -> tuple[str, bool]:
    """(Markdown, whether to offer the Start button)."""
    return _live(settings, with_queue=False)[0]


def _live(settings: host.TabSettings, with_queue: bool = True) -> tuple[tuple[str, bool], str]:
    """The status line and the queue table, from one connection (the live view redraws both)."""
    try:
        with _connect(settings, timeout=3.0) as client:
            info = client.info()
            jobs = client.jobs(limit=10) if with_queue else []
    except PortTaken as exc:  # Start would fail the same way: say what is wrong instead of offering it
        return (f"**The daemon's port is taken by another program:** {exc}", False), _no_queue(exc)
    except DaemonUnavailable as exc:
        return ((f"**No lora-daemon is running** ({exc}).\n\nPress **Start the daemon** to start it in "
                 "its own environment, or run `python -m daemon serve` yourself.", True), _no_queue(exc))
    except (DaemonError, TimeoutError, OSError) as exc:
        return (f"**The daemon at `{_where(settings)}` did not answer as expected:** {exc}", False), _no_queue(exc)
    return _status_line(settings, info), _queue_table(jobs)


def _no_queue(exc: Exception) -> str:
    return f"<p>Job queue unavailable: {html.escape(str(exc))}</p>"


def _status_line(settings: host.TabSettings, info: dict) -> tuple[str, bool]:
    devices = ", ".join(
        f"{d.get('name') or d['type']}" + (f" ({d['memory_free_mb'] / 1024:.1f} GB free)" if d.get("memory_free_mb")
                                           else "")
        for d in info.get("devices", []) if d.get("type") != "cpu") or "CPU only"
    queue = info.get("queue", {})
    return (f"**Daemon running:** lora-daemon {info.get('version', '?')} on `{_where(settings)}` · {devices} · "
            f"{len(queue.get('running', []))} running, {len(queue.get('queued', []))} queued · "
            f"LoRAs go to `{settings.deploy_dir}`", False)


def _status_outputs(settings: host.TabSettings | None, error: str | None = None, status=None):
    if settings is None:
        return f"**Error:** {error}", gr.update(visible=False)
    text, offer_start = status or _status(settings)
    return (f"**Error:** {error}\n\n{text}" if error else text), gr.update(visible=offer_start)


def _settings_or_error():
    try:
        return host.read_settings(), None
    except host.SettingsError as exc:
        return None, str(exc)


def check_daemon():
    settings, error = _settings_or_error()
    return _status_outputs(settings, error)


def start_daemon():
    settings, error = _settings_or_error()
    if settings is None:
        return _status_outputs(None, error)
    if host.exposed_without_login() and not settings.allow_remote:
        return NOT_ALLOWED, gr.update(visible=True)
    try:
        launcher.ensure_daemon(settings.state_dir, python=_daemon_python(settings))
    except PortTaken:
        return _status_outputs(settings)  # the status line says what is wrong
    except DaemonUnavailable as exc:
        return _status_outputs(settings, str(exc))
    return _status_outputs(settings)


# --- the live view -------------------------------------------------------------------------------


def _queue_html(settings: host.TabSettings) -> str:
    return _live(settings)[1]


def _queue_table(jobs: list[dict]) -> str:
    if not jobs:
        return "<p>No jobs yet.</p>"
    rows = []
    for job in jobs:
        progress = job.get("progress") or {}
        steps = f"{progress.get('step', '')}/{progress.get('total', '')}" if progress.get("total") else ""
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(job.get("created_at") or 0))
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in
                                     (job.get("name", ""), job.get("state", ""), steps, created, job.get("id", "")))
                    + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("name", "state", "step", "created", "job"))
    return (f"<table id='lora_daemon_queue_table'><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _samples(view: JobView) -> list:
    from PIL import Image

    images = []
    for path in view.samples[-MAX_SAMPLES:]:
        try:
            with Image.open(path) as img:
                images.append(img.convert("RGB"))
        except OSError:
            continue  # a preview removed meanwhile: show the others
    return images


def _view_outputs(view: JobView, queue_html: str):
    head = f"**{html.escape(view.name or view.job_id)}** · {progress_line(view)}"
    if view.error:
        head += f"\n\n**Failed:** {view.error}"
    if view.state == "finished":
        head += "\n\n**Finished:** copy the text below into your prompt."
    samples = _samples(view)
    report = (view.result or {}).get("report")
    return (head, loss_curve(view.losses), gr.update(value=samples, visible=bool(samples)), lora_prompt(view.result),
            view.job_id, queue_html, evidence(view), _report_file(report))


def _report_file(path: str | None):
    """The report as a file the page can download and open (the browser cannot open the daemon's path)."""
    present = bool(path) and os.path.isfile(path)
    return gr.update(value=path if present else None, visible=present)


def _stream(watch: JobWatch, settings: host.TabSettings, status):
    """Yield the live view as the job's watch changes; the status line and the queue are read again
    every QUEUE_REFRESH_S (a status read once before the job started would say "0 running")."""
    last_version, last_queue, queue_html = -1, 0.0, ""
    while True:
        view = watch.snapshot()
        now = time.monotonic()
        if now - last_queue >= QUEUE_REFRESH_S or view.done:
            line, queue_html = _live(settings)
            status, last_queue, last_version = _status_outputs(settings, status=line), now, -1
        if view.version != last_version or view.done:
            last_version = view.version
            yield (*status, *_view_outputs(view, queue_html))
        if view.done:
            return
        time.sleep(MIN_FRAME_S)
        wait_for_change(watch, last_version, timeout=QUEUE_REFRESH_S)


def _after_job(freed_vram: bool):
    def finish(view: JobView) -> None:
        if freed_vram:
            host.restore_vram()
        if view.state == "finished":
            host.refresh_loras()

    return finish


def _watch(settings: host.TabSettings, job: dict, freed_vram: bool = False) -> JobWatch:
    return WATCHES.ensure(job["id"], lambda: JobWatch(lambda: _connect(settings), job["id"], job.get("name", ""),
                                                      on_end=_after_job(freed_vram)))


def _message(status, text: str):
    """Only the status line changes; the live view keeps what it shows."""
    keep = gr.update()
    return (*status, text, keep, keep, keep, keep, keep, keep, keep)


def train(base_model, dataset, caption_source, output_name, *values):
    """The Train button. `values`: every setting field's value (in form.widget_settings() order), the
    model-file fields (in form.model_file_settings() order), then the advanced YAML box."""
    *fields, advanced = values
    files = fields[len(form.widget_settings()):]
    fields = {s.name: value for s, value in zip(form.widget_settings(), fields)}
    settings, error = _settings_or_error()
    if settings is None:
        yield _message((f"**Error:** {error}", gr.update()), "")
        return
    status = (gr.update(), gr.update())
    if host.exposed_without_login() and not settings.allow_remote:
        yield _message(status, NOT_ALLOWED)
        return
    try:
        model_files = {s.name: host.module_path(s.form.widget, value, s.label)
                       for s, value in zip(form.model_file_settings(), files)}
        config = form.build_config(
            base_model=host.checkpoint_path(base_model), dataset=dataset, caption_source=caption_source,
            output_name=output_name, settings=fields, advanced=advanced, deploy_dir=settings.deploy_dir,
            base_dir=host.base_dir(), model_files=model_files)
    except (form.FormError, host.CheckpointNotFound, host.ModuleNotFound) as exc:
        yield _message(status, f"**Check the form:** {exc}")
        return
    if settings.autostart:
        try:
            running = launcher.daemon_answers(settings.state_dir or client_mod.default_state_dir()) is not None
        except PortTaken:
            running = True  # starting one would fail the same way: the connect below says what is wrong
        if not running:
            yield _message(status, "Starting the daemon ...")
            try:
                launcher.ensure_daemon(settings.state_dir, python=_daemon_python(settings))
            except DaemonUnavailable:
                pass  # the connect below says what is wrong
    status = _status_outputs(settings)
    freed = host.free_vram() if settings.free_vram else False
    try:
        with _connect(settings) as client:
            job = client.submit(config, base_dir=host.base_dir(), source="Train LoRA tab")
    except DaemonUnavailable as exc:
        if freed:
            host.restore_vram()
        yield _message(_status_outputs(settings), f"**No daemon to train with:** {exc}")
        return
    except (DaemonError, TimeoutError) as exc:
        if freed:
            host.restore_vram()
        yield _message(status, f"**The daemon refused the job:** {exc}")
        return
    yield from _stream(_watch(settings, job, freed), settings, status)


def auto_label(dataset, caption_source, clip_model, clip_weights, trigger):
    """Caption the dataset folder with CLIP as a daemon job (queued with training), streaming progress."""
    settings, error = _settings_or_error()
    if settings is None:
        yield f"**Error:** {error}"
        return
    if host.exposed_without_login() and not settings.allow_remote:
        yield NOT_ALLOWED
        return
    try:
        options = form.build_label_options(dataset=dataset, caption_source=caption_source, clip_model=clip_model,
                                           clip_weights=clip_weights, trigger=trigger, base_dir=host.base_dir())
    except form.FormError as exc:
        yield f"**Check the form:** {exc}"
        return
    try:
        with _connect(settings) as client:
            job = client.submit(options, base_dir=host.base_dir(), source="Train LoRA tab (auto-label)", kind="label")
            yield f"Auto-label job {job['id']} queued"
            for event in client.follow(job["id"]):
                kind, data = event["kind"], event["data"]
                if kind == "progress":
                    yield f"Labelling: {data.get('step')}/{data.get('total')} images"
                elif kind == "finished":
                    unreadable = len(data.get("unreadable") or [])
                    text = (f"Labelled {len(data.get('captions') or {})} images, kept "
                            f"{len(data.get('kept') or [])} existing captions: `{data.get('output')}`")
                    if unreadable:
                        text += f" ({unreadable} images could not be read)"
                    yield text + ". Review the captions, then press Train."
                    return
                elif kind in ("failed", "cancelled"):
                    yield f"**Auto-label {kind}:** {data.get('error') or data.get('reason')}"
                    return
    except (DaemonError, TimeoutError, OSError) as exc:
        yield f"**Auto-label failed:** {exc}"


def refresh(job_id: str | None):
    """Status, queue and the live view of the job in the Job box (or the running one), e.g. after a
    page reload; streams until that job ends."""
    settings, error = _settings_or_error()
    status = _status_outputs(settings, error)
    if settings is None or status[1].get("visible"):
        yield (*status, "", None, [], "", job_id or "", "", "", _report_file(None))
        return
    try:
        with _connect(settings) as client:
            job = client.get(job_id) if job_id else next(iter(client.jobs(states=["running"], limit=1)), None)
    except (DaemonError, TimeoutError) as exc:
        yield _message(status, f"**Error:** {exc}")
        return
    if job is None:
        yield (*status, "No job is running.", None, [], "", "", _queue_html(settings), "", _report_file(None))
        return
    yield from _stream(_watch(settings, job), settings, status)


def _control(job_id: str | None, action: str):
    settings, error = _settings_or_error()
    if settings is None:
        return f"**Error:** {error}"
    if host.exposed_without_login() and not settings.allow_remote:
        return NOT_ALLOWED
    if not job_id:
        return f"No job to {action}: the Job box is empty"
    try:
        with _connect(settings) as client:
            job = getattr(client, action)(job_id)
    except (DaemonError, TimeoutError) as exc:
        return f"**{action.capitalize()} failed:** {exc}"
    done = "stopping: it saves what is trained and finishes" if action == "stop" else "cancelled: nothing is saved"
    return f"{job.get('name', job_id)}: {done}"


def stop(job_id):
    return _control(job_id, "stop")


def deploy_best(job_id):
    """Place the job's best checkpoint in the Lora folder beside its last LoRA (never over a file)."""
    settings, error = _settings_or_error()
    if settings is None:
        return f"**Error:** {error}"
    if host.exposed_without_login() and not settings.allow_remote:
        return NOT_ALLOWED
    if not job_id:
        return "No job to deploy from: the Job box is empty"
    try:
        with _connect(settings) as client:
            reply = client.deploy(job_id)
    except (DaemonError, TimeoutError) as exc:
        return f"**Deploy failed:** {exc}"
    host.refresh_loras()
    names = ", ".join(f"`<lora:{os.path.basename(p).removesuffix('.safetensors')}:0.8>`" for p in reply["paths"])
    return f"Deployed the checkpoint of step {reply['step']}: {names}"


def cancel(job_id):
    return _control(job_id, "cancel")


def refresh_checkpoints(current):
    """The WebUI's current titles; a title the page had before a checkpoint was hashed becomes the
    new one (`name.safetensors` -> `name.safetensors [hash]`)."""
    return gr.update(choices=host.checkpoint_titles(), value=host.checkpoint_title(current) or host.default_checkpoint())


def load_checkpoints():
    """On every page load: the titles the WebUI has now (the ones built into the page may be stale)."""
    return refresh_checkpoints(None)


def module_choices(setting) -> list[str]:
    """A model-file field's choices: nothing chosen, then the files of the WebUI's folder for its kind."""
    return ["", *host.module_files(setting.form.widget)]


def refresh_modules(*current):
    """The model-file fields' lists as the WebUI's folders hold them now, keeping what each field shows."""
    return [gr.update(choices=module_choices(s), value=value or "") for s, value in
            zip(form.model_file_settings(), current)]


# --- layout --------------------------------------------------------------------------------------


def setting_field(setting):
    """One setting's field, from its declaration: default, limits, label and help."""
    common = dict(label=setting.label, info=form.field_info(setting), elem_id=f"lora_daemon_{setting.form_id}")
    if setting.choices is not None:
        return gr.Dropdown(choices=list(setting.choices), value=setting.default, **common)
    if setting.type is bool:
        return gr.Checkbox(value=setting.default, **common)
    unset = client_schema.unset_number(setting)
    if setting.type in (int, float) and (setting.default is not None or unset is not None):
        low = unset if unset is not None else setting.minimum
        return gr.Number(value=setting.default if setting.default is not None else unset, minimum=low,
                         maximum=setting.maximum, step=setting.multiple_of or setting.form.step or 1,
                         precision=0 if setting.type is int else None, **common)
    # empty means "not set": text, paths, lists (one item a line, or comma-separated) and optional numbers
    lines = 3 if setting.form.widget == "lines" else 1
    default = "" if setting.default is None else str(setting.default)
    if isinstance(setting.default, (list, tuple)):
        default = ("\n" if setting.form.widget == "lines" else ", ").join(setting.default)
    return gr.Textbox(value=default, lines=lines, placeholder="(not set)" if setting.optional else "", **common)


def _field_rows(settings, per_row: int) -> dict:
    fields = {}
    for start in range(0, len(settings), per_row):
        with gr.Row():
            fields.update({s.name: setting_field(s) for s in settings[start:start + per_row]})
    return fields


def build_tab():
    """The Blocks for `on_ui_tabs`."""
    with gr.Blocks(analytics_enabled=False) as tab:
        with gr.Row():
            status_md = gr.Markdown(elem_id="lora_daemon_status")
        with gr.Row():
            start_btn = gr.Button("Start the daemon", visible=False, elem_id="lora_daemon_start")
            refresh_btn = gr.Button("Refresh", elem_id="lora_daemon_refresh")
        with gr.Row():
            with gr.Column(scale=1):
                with gr.Row():
                    base_model = gr.Dropdown(label="Base model", choices=host.checkpoint_titles(),
                                             value=host.default_checkpoint(), allow_custom_value=True,
                                             elem_id="lora_daemon_base_model")
                    ckpt_refresh = gr.Button("Reload list", elem_id="lora_daemon_refresh_checkpoints")
                dataset = gr.Textbox(label="Dataset folder", placeholder="/path/to/images (relative: WebUI folder)",
                                     elem_id="lora_daemon_dataset")
                caption_source = gr.Radio(form.CAPTION_CHOICES, value=form.CAPTION_AUTO, label="Captions",
                                          elem_id="lora_daemon_captions")
                with gr.Accordion("Auto-label captions (CLIP)", open=False):
                    with gr.Row():
                        clip_model = gr.Textbox(label="CLIP model", placeholder="ViT-B-32 (or a model config .json)",
                                                elem_id="lora_daemon_clip_model")
                        clip_weights = gr.Textbox(label="CLIP weights", placeholder="/path/to/open_clip_model.safetensors "
                                                  "(empty: the local cache)", elem_id="lora_daemon_clip_weights")
                        trigger = gr.Textbox(label="Trigger word", elem_id="lora_daemon_trigger")
                    label_btn = gr.Button("Auto-label the dataset", elem_id="lora_daemon_label")
                output_name = gr.Textbox(label="Output name", placeholder="my_lora", elem_id="lora_daemon_output_name")
                setting_fields = _field_rows(form.basic_settings(), 3)
                with gr.Accordion("Advanced: every other config key", open=False):
                    advanced = gr.Textbox(label="More config (YAML: wins over the fields; every key is in "
                                          "docs/config.md)", lines=6,
                                          placeholder="save_steps: 250\nsample_prompts: [a photo of sks]",
                                          elem_id="lora_daemon_advanced")
                    grouped = form.advanced_settings()
                    for section in dict.fromkeys(s.section for s in grouped):
                        with gr.Accordion(section, open=False):
                            setting_fields.update(_field_rows([s for s in grouped if s.section == section], 2))
                with gr.Accordion("Flux: the separate files and the Flux settings", open=False):
                    gr.Markdown("For a Flux.1 transformer file (`flux1-dev.safetensors`, fp8 too) choose its "
                                "autoencoder from models/VAE and its CLIP-L and T5-XXL from models/text_encoder. "
                                "A checkpoint with all four parts needs none. Settings here are sent only when "
                                "changed.")
                    with gr.Row():
                        file_fields = [gr.Dropdown(label=s.label, choices=module_choices(s), value="",
                                                   allow_custom_value=True, info=s.help,
                                                   elem_id=f"lora_daemon_{s.form_id}")
                                       for s in form.model_file_settings()]
                    setting_fields.update(_field_rows(form.flux_settings(), 2))
                with gr.Row():
                    train_btn = gr.Button("Train", variant="primary", elem_id="lora_daemon_train")
                    stop_btn = gr.Button("Stop (save)", elem_id="lora_daemon_stop")
                    cancel_btn = gr.Button("Cancel", variant="stop", elem_id="lora_daemon_cancel")
            with gr.Column(scale=1):
                progress_md = gr.Markdown(elem_id="lora_daemon_progress")
                loss_img = gr.Image(label="Loss", type="pil", interactive=False, elem_id="lora_daemon_loss")
                samples = gr.Gallery(label="Samples", columns=4, visible=False, elem_id="lora_daemon_samples")
                result_box = gr.Textbox(label="Use in a prompt", interactive=False, show_copy_button=True,
                                        elem_id="lora_daemon_result")
                job_box = gr.Textbox(label="Job", elem_id="lora_daemon_job")
                evidence_md = gr.Markdown(elem_id="lora_daemon_evidence")
                with gr.Row():
                    report_file = gr.File(label="Report (report.html)", interactive=False, visible=False,
                                          elem_id="lora_daemon_report")
                    deploy_btn = gr.Button("Deploy best checkpoint", elem_id="lora_daemon_deploy_best")
                queue_html = gr.HTML(elem_id="lora_daemon_queue")

        status_outputs = [status_md, start_btn]
        live_outputs = [*status_outputs, progress_md, loss_img, samples, result_box, job_box, queue_html, evidence_md,
                        report_file]
        fields = [setting_fields[s.name] for s in form.widget_settings()]  # the order train() reads them in
        form_inputs = [base_model, dataset, caption_source, output_name, *fields, *file_fields, advanced]

        train_btn.click(train, inputs=form_inputs, outputs=live_outputs, show_progress="hidden")
        refresh_btn.click(refresh, inputs=[job_box], outputs=live_outputs, show_progress="hidden")
        start_btn.click(start_daemon, outputs=status_outputs)
        label_btn.click(auto_label, inputs=[dataset, caption_source, clip_model, clip_weights, trigger],
                        outputs=[progress_md], show_progress="hidden")
        stop_btn.click(stop, inputs=[job_box], outputs=[progress_md], queue=False)
        cancel_btn.click(cancel, inputs=[job_box], outputs=[progress_md], queue=False)
        deploy_btn.click(deploy_best, inputs=[job_box], outputs=[progress_md], queue=False)
        ckpt_refresh.click(refresh_checkpoints, inputs=[base_model], outputs=[base_model], queue=False)
        ckpt_refresh.click(refresh_modules, inputs=file_fields, outputs=file_fields, queue=False)
        tab.load(check_daemon, outputs=status_outputs)
        tab.load(load_checkpoints, outputs=[base_model], queue=False)
        tab.load(refresh_modules, inputs=file_fields, outputs=file_fields, queue=False)
    return tab
