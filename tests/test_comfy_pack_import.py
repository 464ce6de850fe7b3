"""The node pack loads in a host Python without torch (or any daemon dependency), the way ComfyUI
loads custom nodes, and leaves the host's import path as it found it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from comfy_host import REPO

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
    {prelude}
    path_before = list(sys.path)
    pack_dir = Path(sys.argv[2])
    name = str(pack_dir).replace(".", "_x_")  # what ComfyUI's nodes.load_custom_node does
    spec = importlib.util.spec_from_file_location(name, pack_dir / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    nodes = module.NODE_CLASS_MAPPINGS
    try:
        module.daemon_job.connect()
        connect_error = None
    except Exception as exc:
        connect_error = str(exc)
    print(json.dumps({
        "nodes": {k: [c.FUNCTION, c.CATEGORY, list(map(str, c.RETURN_TYPES)), c.OUTPUT_NODE] for k, c in nodes.items()},
        "display": module.NODE_DISPLAY_NAME_MAPPINGS,
        "heavy": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED),
        "path_unchanged": sys.path == path_before,
        "shared": sys.modules["shared"].__file__,
        "connect_error": connect_error,
    }))
""")


def load_pack(tmp_path, prelude: str = "") -> subprocess.CompletedProcess:
    custom_nodes = tmp_path / "ComfyUI" / "custom_nodes"
    custom_nodes.mkdir(parents=True)
    (custom_nodes / "lora_daemon").symlink_to(REPO / "comfy_nodes", target_is_directory=True)
    script = LOADER.replace("{prelude}", prelude)
    # run from ComfyUI's folder with nothing of ours on the path, as ComfyUI would
    return subprocess.run([sys.executable, "-c", script, json.dumps(BLOCKED), str(custom_nodes / "lora_daemon")],
                          cwd=tmp_path / "ComfyUI", capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})


def test_the_pack_loads_without_torch_and_leaves_sys_path_alone(tmp_path):
    proc = load_pack(tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["nodes"] == {
        "LoraDaemonTrainLoRA": ["train", "loaders/lora-daemon", ["MODEL", "CLIP", "*", "STRING"], True],
        "LoraDaemonJobStatus": ["status", "loaders/lora-daemon", ["STRING"], True],
        "LoraDaemonAutoLabel": ["label", "loaders/lora-daemon", ["STRING", "STRING"], True],
    }
    assert set(out["display"]) == set(out["nodes"])
    assert out["heavy"] == []
    assert out["path_unchanged"]  # the repo's `daemon`, `tests`, `docs` never shadow the host's modules
    assert out["shared"] == str(REPO / "shared" / "__init__.py")
    # running a node needs websockets in the host's Python: the error says how to get it
    assert out["connect_error"] == ("lora-daemon nodes need the websockets package in ComfyUI's Python: "
                                    f"pip install -r {REPO / 'comfy_nodes' / 'requirements.txt'}")


def test_a_foreign_shared_package_is_refused_by_name(tmp_path):
    other = tmp_path / "elsewhere" / "shared"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("")
    proc = load_pack(tmp_path, prelude=f"sys.path.insert(0, {str(other.parent)!r}); import shared")
    assert proc.returncode != 0
    assert f"another package named 'shared' is already loaded from {other}" in proc.stderr
    assert str(REPO / "shared") in proc.stderr


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
