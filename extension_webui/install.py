"""Run by AUTOMATIC1111 / Forge with the WebUI's own Python at every start.

The tab only talks to the daemon, so the one package it needs is `websockets` (the WebUI's gradio
already brings PIL and PyYAML). It is installed only when missing; an existing copy is left as it is,
because gradio pins its version. torch, diffusers and transformers are never touched: training runs
in the daemon's own environment.
"""

import importlib.metadata
import importlib.util
import subprocess
import sys

NEEDED = "websockets>=11"  # the synchronous client appeared in websockets 11


def main() -> None:
    if importlib.util.find_spec("websockets") is None:
        try:
            import launch  # the WebUI's installer helpers: uses its pip options and index
        except ImportError:
            subprocess.check_call([sys.executable, "-m", "pip", "install", NEEDED])
        else:
            launch.run_pip(f'install "{NEEDED}"', "websockets for the Train LoRA tab")
        return
    version = importlib.metadata.version("websockets")
    if int(version.split(".")[0]) < 11:
        print(f"[lora-daemon] websockets {version} is older than 11; the Train LoRA tab needs {NEEDED}. "
              "It is not upgraded here because gradio pins it; upgrade the WebUI.", file=sys.stderr)


main()
