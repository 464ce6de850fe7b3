"""Start the stand-in WebUI the way AUTOMATIC1111 v1.10.1 does, as far as an extension can tell.

    FAKE_WEBUI_ROOT=<folder with models/ and extensions/> python webui.py --port P [--build-only]

Run extension installers, load built-in and user extension scripts (each extension folder on sys.path
only while its scripts load), collect settings and tabs, `queue(64)`, launch on 127.0.0.1, call the
app-started callbacks, print `READY <url>` and serve until killed. As in the WebUI, the txt2img tab
carries the extra-networks pages (Lora cards), extensions' javascript/*.js are put into the page, and the
selected checkpoint is loaded (hashed, so retitled) only after the UI was built. $FAKE_WEBUI_BLOCK lists top-level
packages that must not be imported (torch ...): importing one fails, as it would in a Python without it.
"""

import importlib.abc
import importlib.util
import os
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))


class _Blocker(importlib.abc.MetaPathFinder):
    def __init__(self, names):
        self.names = set(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.names:
            raise ImportError(f"{fullname} is blocked in this WebUI test (the extension must not import it)")
        return None


blocked = [n for n in os.environ.get("FAKE_WEBUI_BLOCK", "").split(",") if n]
if blocked:
    sys.meta_path.insert(0, _Blocker(blocked))

sys.path.insert(0, HERE)
os.environ.setdefault("FAKE_WEBUI_ROOT", HERE)
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from modules import paths, script_callbacks, sd_models, shared, ui_gradio_extensions  # noqa: E402
from modules.record import record  # noqa: E402


def extension_dirs():
    for base in (paths.extensions_builtin_dir, os.path.join(HERE, "extensions-builtin"), paths.extensions_dir):
        if os.path.isdir(base):
            for name in sorted(os.listdir(base)):
                if os.path.isdir(os.path.join(base, name)):
                    yield os.path.join(base, name)


def run_installers():
    env = {**os.environ, "PYTHONPATH": HERE}
    for ext in extension_dirs():
        installer = os.path.join(ext, "install.py")
        if os.path.isfile(installer):
            result = subprocess.run([sys.executable, installer], cwd=ext, env=env, capture_output=True, text=True)
            record("install.py", extension=os.path.basename(ext), returncode=result.returncode,
                   output=(result.stdout + result.stderr)[-2000:])
            if result.returncode != 0:
                print(f"Error running install.py for extension {ext}:\n{result.stdout}{result.stderr}")


def load_scripts():
    seen = set()
    for ext in extension_dirs():
        scripts = os.path.join(ext, "scripts")
        if os.path.realpath(ext) in seen or not os.path.isdir(scripts):
            continue
        seen.add(os.path.realpath(ext))
        sys.path.insert(0, ext)
        try:
            for filename in sorted(os.listdir(scripts)):
                if filename.endswith(".py"):
                    path = os.path.join(scripts, filename)
                    spec = importlib.util.spec_from_file_location(os.path.basename(path), path)
                    module = importlib.util.module_from_spec(spec)
                    spec.loader.exec_module(module)
        finally:
            sys.path.remove(ext)


def create_ui():
    import gradio as gr
    from modules import ui_extra_networks

    script_callbacks.before_ui_callback()
    script_callbacks.ui_settings_callback()
    with gr.Blocks(analytics_enabled=False) as txt2img_interface:
        with gr.Tabs(elem_id="txt2img_extra_tabs"):
            with gr.Tab("Generation", id="txt2img_generation"):
                gr.Markdown("txt2img stand-in")
            ui_extra_networks.create_ui(txt2img_interface, [], "txt2img")
    extension_tabs = script_callbacks.ui_tabs_callback()
    interfaces = [(txt2img_interface, "txt2img", "txt2img"), *extension_tabs]
    with gr.Blocks(analytics_enabled=False, title="Stable Diffusion") as demo:
        with gr.Tabs(elem_id="tabs"):
            for interface, label, ifid in interfaces:
                with gr.TabItem(label, id=ifid, elem_id=f"tab_{ifid}"):
                    interface.render()
    return demo, [label for _, label, _ in extension_tabs]


def main():
    run_installers()
    sd_models.list_models()
    load_scripts()
    ui_gradio_extensions.reload_javascript()
    demo, labels = create_ui()
    # the WebUI loads the checkpoint in a thread while it builds the UI; a large one is hashed (and so
    # retitled `name [hash]`) only after the UI, and pages loaded meanwhile, hold its unhashed title.
    # $FAKE_WEBUI_LOAD_MODEL_WHEN names a file: the load waits until it exists (a page loaded first).
    flag = os.environ.get("FAKE_WEBUI_LOAD_MODEL_WHEN")
    if flag:
        def load_when_asked():
            while not os.path.exists(flag):
                time.sleep(0.1)
            sd_models.load_model()

        threading.Thread(target=load_when_asked, daemon=True, name="load_model").start()
    else:
        sd_models.load_model()
    if shared.cmd_opts.build_only:
        print("TABS", labels, "SETTINGS", sorted(k for k in shared.opts.data_labels if k.startswith("lora_daemon")))
        return
    shared.demo = demo
    demo.queue(64)
    # the WebUI folder's files (extensions' javascript/) are served: gradio 3 allows its working folder
    # by itself, gradio 4 (Forge) only what allowed_paths names
    app, local_url, _ = demo.launch(server_name="127.0.0.1", server_port=shared.cmd_opts.port,
                                    prevent_thread_lock=True, show_api=False, quiet=True,
                                    allowed_paths=[paths.script_path])
    script_callbacks.app_started_callback(demo, app)
    print(f"READY {local_url}", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
