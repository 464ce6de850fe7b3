"""Start the stand-in WebUI in this process, build its tabs, and (optionally) press Train in ours the way a
click does: the Train handler gets the fields' values as the built page holds them. Run with the gradio 3
test environment's Python, in a WebUI folder (FAKE_WEBUI_ROOT), like webui.py.

    python tab_driver.py [--train --dataset DIR --output-name NAME --set KEY=VALUE ... --advanced YAML]

Prints one JSON object: the tabs, the `shared*`/`daemon*` modules in sys.modules (with their files),
what another extension's tab shows (elem_id `other_tab_text`), and, with --train, the final status and
prompt text.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train", action="store_true")
    parser.add_argument("--dataset")
    parser.add_argument("--output-name")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--advanced", default="")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # the stand-in WebUI parses its own command line
    sys.path.insert(0, os.path.join(HERE, "fake_webui"))
    import webui  # the stand-in: blocks torch, puts its `modules` on sys.path
    from modules import sd_models

    webui.run_installers()
    sd_models.list_models()
    webui.load_scripts()
    demo, labels = webui.create_ui()
    fields = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    seen = {"tabs": labels, "other_tab": getattr(fields.get("other_tab_text"), "value", None)}
    if args.train:
        ui, form = sys.modules["lora_daemon_webui.ui"], sys.modules["lora_daemon_webui.form"]
        overrides = dict(item.split("=", 1) for item in args.set)
        values = [overrides.get(s.name, fields[f"lora_daemon_{s.form_id}"].value) for s in form.widget_settings()]
        base_model = fields["lora_daemon_base_model"].value
        frames = list(ui.train(base_model, args.dataset, form.CAPTION_AUTO, args.output_name, *values, args.advanced))
        seen.update(progress=frames[-1][2], result=frames[-1][5])
    seen["modules"] = {n: getattr(m, "__file__", None) for n, m in sys.modules.items()
                       if n.split(".")[0] in ("shared", "daemon")}
    print(json.dumps(seen, default=str))


if __name__ == "__main__":
    main()
