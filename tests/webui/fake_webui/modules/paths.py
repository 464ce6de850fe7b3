"""As modules/paths.py (paths_internal): the WebUI folder, its data folder and models folder."""

import os

script_path = os.environ.get("FAKE_WEBUI_ROOT", os.getcwd())
data_path = os.environ.get("FAKE_WEBUI_DATA", script_path)
models_path = os.path.join(data_path, "models")
extensions_dir = os.path.join(data_path, "extensions")
extensions_builtin_dir = os.path.join(script_path, "extensions-builtin")
