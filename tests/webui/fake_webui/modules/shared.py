"""As modules/shared.py: `opts`, `cmd_opts` and `OptionInfo` (imported as `modules.shared`)."""

import argparse
import os

from modules import options, paths

OptionInfo = options.OptionInfo

parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, default=7860)
parser.add_argument("--listen", action="store_true")
parser.add_argument("--share", action="store_true")
parser.add_argument("--server-name", type=str, default=None)
parser.add_argument("--gradio-auth", type=str, default=None)
parser.add_argument("--gradio-auth-path", type=str, default=None)
parser.add_argument("--ui-settings-file", type=str, default=os.path.join(paths.data_path, "config.json"))
parser.add_argument("--build-only", action="store_true", help="stand-in only: build the UI, print the tabs, exit")
# added by extensions-builtin/Lora/preload.py in the real WebUI
parser.add_argument("--lora-dir", type=str, default=os.path.join(paths.models_path, "Lora"))
cmd_opts, _ = parser.parse_known_args()

opts = options.Options({"sd_model_checkpoint": OptionInfo(None, "Stable Diffusion checkpoint")}, set())
if os.path.exists(cmd_opts.ui_settings_file):
    opts.load(cmd_opts.ui_settings_file)

demo = None
