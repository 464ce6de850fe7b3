"""The setting declarations (shared/schema) and what is generated from them: TrainConfig, the messages,
the hosts' inputs, the JSON Schema and the docs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from shared import schema
from shared.config import FIELDS, TrainConfig
from shared.preflight import load_config
from shared.schema.json_schema import config_schema

REPO = Path(__file__).resolve().parent.parent


def test_trainconfig_is_the_declarations():
    assert list(FIELDS) == list(schema.TRAIN)
    for name, setting in schema.TRAIN.items():
        assert FIELDS[name].default == setting.default and FIELDS[name].metadata["help"] == setting.help
    for setting in [*schema.TRAIN.values(), *schema.LABEL.values()]:
        assert setting.help and setting.section and setting.tasks
        if setting.type is Path:  # the daemon confines every path by the access it declares
            assert setting.path in ("read", "write"), setting.name
    assert schema.TRAIN["cache_dir"].path == "write"  # the latent cache is written


def test_the_canonical_dict_rebuilds_the_same_config(sd_config):
    cfg = load_config(sd_config(sample_prompts=["a, b", "c"], cache_dir="cache"))
    again = TrainConfig.from_canonical(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and isinstance(again.base_model, Path) and again.cache_dir == cfg.cache_dir


def test_the_job_config_json_schema_carries_the_declarations():
    train = config_schema("train")
    rank = train["properties"]["lora_rank"]
    assert (rank["type"], rank["minimum"], rank["maximum"], rank["default"]) == ("integer", 1, 4096, 8)
    lr = train["properties"]["learning_rate"]
    # the range's top is Prodigy's (a multiplier); the optimizer's own range is a rule beside it
    assert lr["exclusiveMinimum"] == 0 and lr["maximum"] == 10 and lr["x-form"]["level"] == "basic"
    assert train["properties"]["optimizer_args"]["type"] == ["object", "null"]
    weights = train["properties"]["down_lr_weight"]["anyOf"]
    assert weights[0] == {"type": "array", "items": {"type": "number", "minimum": 0}} and weights[1:] == [
        {"type": "string"}, {"type": "null"}]
    res = train["properties"]["resolution"]
    assert res["multipleOf"] == 8 and res["x-tasks"] == ["flux", "sd"]
    assert train["properties"]["max_train_steps"]["type"] == ["integer", "null"]
    assert train["properties"]["output_name"]["pattern"].startswith("^(?:")
    assert train["required"] == ["base_model", "train_data_dir"] and train["additionalProperties"] is False
    assert set(config_schema("label")["properties"]) == {*schema.LABEL, "format"}
    # the protocol's submit uses them, and `python -m daemon schema` prints the same
    from daemon.protocol import json_schema

    shipped = json_schema()["$defs"]
    assert shipped["train_config"] == train and shipped["client_submit"]["else"]["properties"]["config"] == {
        "$ref": "#/$defs/train_config"}
    out = subprocess.run([sys.executable, "-m", "daemon", "schema"], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert out.returncode == 0 and json.loads(out.stdout)["properties"] == train["properties"]


GENERATED = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    root = Path(sys.argv[1])
    sys.path[:0] = [str(root), str(root / "extension_webui"), sys.argv[2]]
    import folder_paths
    folder_paths.configure(sys.argv[3])
    from lora_daemon_webui import form
    from shared.config_docs import render, render_protocol_block
    from daemon.protocol import json_schema
    import importlib.util
    spec = importlib.util.spec_from_file_location("pack", root / "comfy_nodes" / "__init__.py",
                                                  submodule_search_locations=[str(root / "comfy_nodes")])
    pack = importlib.util.module_from_spec(spec); sys.modules["pack"] = pack; spec.loader.exec_module(pack)
    rank = [s for s in form.basic_settings() if s.name == "lora_rank"][0]
    node = pack.TrainLora.INPUT_TYPES()["required"]["lora_rank"][1]
    prop = json_schema()["$defs"]["train_config"]["properties"]["lora_rank"]
    print(json.dumps({
        "tab": [rank.maximum, rank.default, form.field_info(rank)],
        "node": [node["max"], node["default"], node["tooltip"]],
        "protocol": [prop["maximum"], prop["default"]],
        "config_md": [line for line in render().splitlines() if line.startswith("| `lora_rank`")],
        "protocol_md": [line for line in render_protocol_block().splitlines() if line.startswith("| `lora_rank`")],
    }))
""")


def test_one_change_in_a_declaration_shows_in_the_tab_the_node_the_protocol_and_the_docs(tmp_path):
    """Edit the rank's declaration in a copy of the checkout (nothing else) and read every consumer."""
    copy = tmp_path / "checkout"
    ignore = shutil.ignore_patterns("__pycache__", ".git", ".venv", "demo_output", "tests", "benchmarks")
    shutil.copytree(REPO, copy, ignore=ignore)
    lora = copy / "shared" / "schema" / "lora.py"
    old = 'Setting("lora_rank", int, 8, "LoRA rank (network dim).", minimum=1, maximum=4096,'
    assert old in lora.read_text()
    lora.write_text(lora.read_text().replace(old, old.replace("int, 8,", "int, 12,").replace("4096", "777")))

    (tmp_path / "ComfyUI").mkdir()
    out = subprocess.run([sys.executable, "-c", GENERATED, str(copy), str(REPO / "tests" / "comfy_standins"),
                          str(tmp_path / "ComfyUI")], capture_output=True, text=True, timeout=120,
                         env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["tab"][:2] == [777, 12] and seen["tab"][2].endswith("(at least 1 and at most 777)")
    assert seen["node"][:2] == [777, 12] and seen["node"][2].endswith("(at least 1 and at most 777)")
    assert seen["protocol"] == [777, 12]
    assert seen["config_md"] == ["| `lora_rank` | int | `12` | at least 1 and at most 777 | all | LoRA rank (network dim). |"]
    assert seen["protocol_md"] == ["| `lora_rank` | integer | `12` | at least 1 and at most 777 | all |"]


def test_the_thin_modules_import_nothing_but_the_standard_library_and_each_other():
    """The hosts load these files under a private package name: an absolute import of ours (or of a
    third-party package) would drag `shared` or a dependency into the host's Python. The client's one
    dependency, websockets, is imported inside the functions that talk to the daemon."""
    import ast

    from shared import host_import

    files = [REPO / "shared" / "__init__.py", REPO / "shared" / "host_import.py"]
    files += [REPO / "shared" / f"{name}.py" for name in host_import.THIN_MODULES if name != "schema"]
    files += sorted((REPO / "shared" / "schema").glob("*.py"))
    for path in files:
        tree = ast.parse(path.read_text())
        module_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                continue  # another thin module
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                for name in names:
                    top = name.split(".")[0]
                    allowed = top in sys.stdlib_module_names or (top == "websockets" and id(node) not in module_level)
                    assert allowed, f"{path.relative_to(REPO)} imports {name}"
