"""As launch.py / modules/launch_utils.py: the installer helpers an extension's install.py may use."""

import importlib.util
import os
import subprocess
import sys

python = sys.executable
index_url = os.environ.get("INDEX_URL", "")


def is_installed(package):
    return importlib.util.find_spec(package) is not None


def run_pip(command, desc=None, live=False):
    from modules.record import record

    record("run_pip", command=command, desc=desc)
    if os.environ.get("FAKE_WEBUI_PIP_DRY_RUN"):  # stand-in only: tests must not reach a package index
        return ""
    index_url_line = f" --index-url {index_url}" if index_url != "" else ""
    return subprocess.run(f'"{python}" -m pip {command} --prefer-binary{index_url_line}', shell=True, check=True,
                          capture_output=not live, text=True).stdout
