"""The node pack loads in a host Python without torch (or any daemon dependency), the way ComfyUI
loads custom nodes, and leaves the host's import path as it found it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
from comfy_host import REPO, STANDINS

BLOCKED = ["torch", "torchvision", "diffusers", "transformers", "peft", "accelerate", "safetensors", "numpy",
           "PIL", "yaml", "open_clip", "websockets"]  # websockets is needed to run a node, not to load the pack

LOADER = textwrap.dedent("""
    import importlib.abc, importlib.util, json, sys
    from pathlib import Path

    BLOCKED = set(json.loads(sys.argv[1]))

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is not installed here (blocked by the test)")

    sys.meta_path.insert(0, Block())
    sys.path.insert(0, sys.argv[3])  # ComfyUI's own modules (the stand-ins), as they are in ComfyUI
    import folder_paths
    folder_paths.configure(str(Path.cwd()))
    path_before = list(sys.path)
    modules = {}
    for pack_dir in map(Path, json.loads(sys.argv[2])):  # ComfyUI's order: whatever os.listdir gave
        name = str(pack_dir).replace(".", "_x_")  # what ComfyUI's nodes.load_custom_node does
        spec = importlib.util.spec_from_file_location(name, pack_dir / "__init__.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        modules[pack_dir.name] = module
    ours = modules["lora_daemon"]
    nodes = ours.NODE_CLASS_MAPPINGS
    inputs = nodes["LoraDaemonTrainLoRA"].INPUT_TYPES()["required"]
    flux_inputs = nodes["LoraDaemonTrainFluxLoRA"].INPUT_TYPES()["required"]  # its combos read ComfyUI's folders
    try:
        ours.daemon_job.connect()
        connect_error = None
    except Exception as exc:
        connect_error = str(exc)
    foreign = modules.get("other_pack")
    foreign_node = foreign.NODE_CLASS_MAPPINGS["OtherNode"]().run()[0] if foreign else None
    print(json.dumps({
        "nodes": {k: [c.FUNCTION, c.CATEGORY, list(map(str, c.RETURN_TYPES)), c.OUTPUT_NODE] for k, c in nodes.items()},
        "display": ours.NODE_DISPLAY_NAME_MAPPINGS,
        "inputs": sorted(inputs),
        "flux_inputs": sorted(flux_inputs),
        "heavy": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED),
        "path_changes": [p for p in sys.path if p not in path_before],
        "shared": {m: getattr(sys.modules[m], "__file__", None) for m in sys.modules if m.split(".")[0] in ("shared", "daemon")},
        "foreign_node": foreign_node,
        "connect_error": connect_error,
    }))
""")


def load_packs(tmp_path, *, foreign_first: bool | None = None, blocked=BLOCKED) -> dict:
    """Load our pack (and, unless foreign_first is None, a pack that ships its own top-level `shared`
    and puts its folder on sys.path, as some public packs do) the way ComfyUI loads custom nodes."""
    custom_nodes = tmp_path / "ComfyUI" / "custom_nodes"
    custom_nodes.mkdir(parents=True)
    # a checkout of the pack and the thin client without a daemon environment (.venv): a node that runs
    # finds no daemon and none to start, instead of starting one on the default port
    checkout = tmp_path / "checkout"
    for part in ("comfy_nodes", "shared"):
        shutil.copytree(REPO / part, checkout / part, ignore=shutil.ignore_patterns("__pycache__"))
    (custom_nodes / "lora_daemon").symlink_to(checkout / "comfy_nodes", target_is_directory=True)
    order = [custom_nodes / "lora_daemon"]
    if foreign_first is not None:
        other = custom_nodes / "other_pack"
        (other / "shared").mkdir(parents=True)
        (other / "shared" / "__init__.py").write_text("WHO = 'other pack'\n")
        (other / "shared" / "late.py").write_text("def hello():\n    return 'other pack works'\n")
        (other / "__init__.py").write_text(textwrap.dedent("""
            import os, sys
            sys.path.insert(0, os.path.dirname(__file__))
            import shared
            assert shared.WHO == "other pack", shared

            class OtherNode:
                def run(self):
                    import shared.late  # imported when the node runs, after every pack has loaded
                    return (shared.late.hello(),)

            NODE_CLASS_MAPPINGS = {"OtherNode": OtherNode}
        """))
        order = [other, *order] if foreign_first else [*order, other]
    proc = subprocess.run([sys.executable, "-c", LOADER, json.dumps(blocked), json.dumps([str(p) for p in order]),
                           str(STANDINS)],
                          cwd=tmp_path / "ComfyUI", capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})  # nothing of ours on the path
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_the_pack_loads_without_torch_and_leaves_sys_path_and_modules_alone(tmp_path):
    out = load_packs(tmp_path)
    assert out["nodes"] == {
        "LoraDaemonTrainLoRA": ["train", "loaders/lora-daemon", ["MODEL", "CLIP", "*", "STRING", "STRING"], True],
        "LoraDaemonTrainFluxLoRA": ["train", "loaders/lora-daemon", ["MODEL", "CLIP", "*", "STRING", "STRING"], True],
        "LoraDaemonJobStatus": ["status", "loaders/lora-daemon", ["STRING"], True],
        "LoraDaemonAutoLabel": ["label", "loaders/lora-daemon", ["STRING", "STRING"], True],
    }
    assert set(out["display"]) == set(out["nodes"])
    assert {"transformer", "flux_ae", "flux_clip_l", "flux_t5xxl", "fp8_base"} <= set(out["flux_inputs"])
    assert out["heavy"] == []
    assert out["path_changes"] == []  # the repo's `daemon`, `tests`, `docs` never shadow the host's modules
    assert out["shared"] == {}  # no `shared` or `daemon` of ours in ComfyUI's sys.modules
    # running a node needs websockets in the host's Python: the error says how to get it
    assert out["connect_error"] == ("lora-daemon nodes need the websockets package in ComfyUI's Python: "
                                    f"pip install -r {tmp_path / 'checkout' / 'comfy_nodes' / 'requirements.txt'}")


@pytest.mark.parametrize("foreign_first", [True, False], ids=["other-pack-first", "ours-first"])
def test_a_pack_with_its_own_top_level_shared_works_beside_ours_in_either_order(tmp_path, foreign_first):
    out = load_packs(tmp_path, foreign_first=foreign_first, blocked=[b for b in BLOCKED if b != "websockets"])
    other = tmp_path / "ComfyUI" / "custom_nodes" / "other_pack" / "shared"
    # the other pack's `shared` is the only one, and it still imports its own submodules when a node runs
    assert out["shared"] == {"shared": str(other / "__init__.py"), "shared.late": str(other / "late.py")}
    assert out["foreign_node"] == "other pack works"
    # ours: the node's inputs come from the declarations, and the client and launcher run (no daemon here)
    assert {"lora_rank", "learning_rate", "resolution", "training_seed"} <= set(out["inputs"])
    assert out["connect_error"].startswith("lora-daemon: no lora-daemon is running and none can be started")
    assert out["heavy"] == []


def test_the_lora_name_output_passes_comfyuis_link_check_for_a_combo():
    """ComfyUI's validate_node_input accepts a link when `not received_type != input_type`; a
    LoraLoader's lora_name input type is the list of file names."""
    sys.path.insert(0, str(REPO))
    try:
        from comfy_nodes.wildcard import ANY
    finally:
        sys.path.remove(str(REPO))
    lora_name_input = ["a.safetensors", "b.safetensors"]
    assert not ANY != lora_name_input
    assert not ANY != "STRING"
    assert ANY == "*" and str(ANY) == "*"
    assert "STRING" != lora_name_input  # what a plain STRING output would get: refused
