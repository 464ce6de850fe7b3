"""A catalogue of bad inputs: each refused with one clear line that names the key or file, and
nothing written (no job queued, no output or Lora folder created).

Config, dataset and path problems go through the daemon's `submit` (they are caught there, before
a job exists; the same validation as `train --config`). Broken model files are found only when the
model loads, so they go through the CLI (`python -m daemon train`, run in this process to spare a
torch start per case). A few frames go raw, for what a client library would never send.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from daemon_harness import REPO, DaemonProcess

from shared.client import DaemonError

_refused: dict[str, bool] = {}
PWNED = "/tmp/lora_daemon_reliability_pwned"  # a payload that ran would create this file


@dataclass
class Case:
    id: str
    via: str  # "submit", "raw" or "cli"
    expect: str  # the key or file the one-line error must name
    change: object = None  # config overrides, or a function(ctx) -> dict of overrides / submit kwargs


def drop(*keys):
    return lambda ctx: {k: None for k in keys}


def folder_with(ctx, name, files: dict[str, bytes]) -> str:
    folder = ctx.readable / name
    folder.mkdir(parents=True, exist_ok=True)
    for file, data in files.items():
        (folder / file).write_bytes(data)
    return str(folder)


def png(ctx) -> bytes:
    return next(Path(ctx.images).glob("*.png")).read_bytes()


def link(ctx, name, target, root) -> str:
    path = root / name
    if not path.exists():
        path.symlink_to(target, target_is_directory=True)
    return str(path)


SUBMIT = [
    Case("unknown key", "submit", "lerning_rate", {"lerning_rate": 1e-3}),
    Case("learning rate as text", "submit", "learning_rate", {"learning_rate": "lots"}),
    Case("negative learning rate", "submit", "learning_rate", {"learning_rate": -1}),
    Case("absurd learning rate", "submit", "learning_rate", {"learning_rate": 1e9}),
    Case("NaN learning rate", "submit", "learning_rate", {"learning_rate": math.nan}),
    Case("batch size 0", "submit", "batch_size", {"batch_size": 0}),
    Case("absurd batch size", "submit", "batch_size", {"batch_size": 10**9}),
    Case("resolution not a multiple of 8", "submit", "resolution", {"resolution": 7}),
    Case("absurd resolution", "submit", "resolution", {"resolution": 10**6}),
    Case("rank 0", "submit", "lora_rank", {"lora_rank": 0}),
    Case("absurd rank", "submit", "lora_rank", {"lora_rank": 10**6}),
    Case("negative steps", "submit", "max_train_steps", {"max_train_steps": -5}),
    Case("absurd steps", "submit", "max_train_steps", {"max_train_steps": 10**12}),
    Case("steps as text", "submit", "max_train_steps", {"max_train_steps": "ten"}),
    Case("absurd accumulation", "submit", "gradient_accumulation_steps", {"gradient_accumulation_steps": 10**9}),
    Case("dropout over 1", "submit", "lora_dropout", {"lora_dropout": 5.0}),
    Case("negative alpha", "submit", "lora_alpha", {"lora_alpha": -1}),
    Case("negative save_steps", "submit", "save_steps", {"save_steps": -1}),
    Case("unknown scheduler", "submit", "lr_scheduler", {"lr_scheduler": "bogus"}),
    Case("unknown precision", "submit", "mixed_precision", {"mixed_precision": "fp64"}),
    Case("seed as text", "submit", "seed", {"seed": "abc"}),
    Case("missing base_model", "submit", "base_model", drop("base_model")),
    Case("base_model does not exist", "submit", "nope.safetensors",
         lambda ctx: {"base_model": str(ctx.readable / "nope.safetensors")}),
    Case("unicode base_model path missing", "submit", "модель_ñ.safetensors",
         lambda ctx: {"base_model": str(ctx.readable / "модель_ñ.safetensors")}),
    Case("train_data_dir is a file", "submit", "train_data_dir",
         lambda ctx: {"train_data_dir": str(ctx.tiny_sd["safetensors"])}),
    Case("empty dataset folder", "submit", "train_data_dir",
         lambda ctx: {"train_data_dir": folder_with(ctx, "empty", {})}),
    Case("dataset without images", "submit", "train_data_dir",
         lambda ctx: {"train_data_dir": folder_with(ctx, "texts", {"a.txt": b"a cat", "b.md": b"# hi"})}),
    Case("corrupt images", "submit", "train_data_dir",
         lambda ctx: {"train_data_dir": folder_with(ctx, "corrupt", {f"{i}.png": os.urandom(500) for i in range(3)})}),
    Case("truncated images", "submit", "train_data_dir",
         lambda ctx: {"train_data_dir": folder_with(ctx, "truncated", {f"{i}.png": png(ctx)[:120] for i in range(3)})}),
    Case("metadata not JSON", "submit", "meta.json",
         lambda ctx: {"metadata_path": folder_with(ctx, "meta", {"meta.json": b"{not json"}) + "/meta.json"}),
    Case("output_name ../../x", "submit", "output_name", {"output_name": "../../x"}),
    Case("output_name absolute", "submit", "output_name", {"output_name": "/tmp/x"}),
    Case("output_name with a slash and unicode", "submit", "output_name", {"output_name": "chat/ñandú"}),
    Case("output_name with NUL", "submit", "output_name", {"output_name": "a\x00b"}),
    Case("output_dir outside write roots", "submit", "output_dir", {"output_dir": "/etc/lora-out"}),
    Case("output_dir relative without base_dir", "submit", "output_dir", {"output_dir": "out"}),
    Case("output_dir escaping with ..", "submit", "output_dir",
         lambda ctx: {"output_dir": str(ctx.allowed / ".." / "escaped")}),
    Case("log_dir outside write roots", "submit", "log_dir", lambda ctx: {"log_dir": str(ctx.outside / "logs")}),
    Case("deploy_dir through a symlink out", "submit", "deploy_dir",
         lambda ctx: {"deploy_dir": link(ctx, "escape", ctx.outside, ctx.allowed) + "/Lora"}),
    Case("train_data_dir through a symlink out", "submit", "train_data_dir",
         lambda ctx: {"train_data_dir": link(ctx, "demo", REPO / "shared" / "demo" / "images", ctx.readable)}),
    Case("deploy_dirs outside", "submit", "deploy_dirs", lambda ctx: {"_deploy_dirs": ["/etc"]}),
    Case("deploy_dirs relative", "submit", "deploy_dirs", lambda ctx: {"_deploy_dirs": ["Lora"]}),
    Case("base_dir relative", "submit", "base_dir", lambda ctx: {"_base_dir": "relative/dir"}),
]

RAW = [
    Case("config not an object", "raw", "config", {"config": ["base_model"]}),
    Case("absurd priority", "raw", "priority", {"priority": 2**70}),
    Case("dry_run not a boolean", "raw", "dry_run", {"dry_run": "yes"}),
    Case("lone surrogate in a name", "raw", "surrogate", '{"v":1,"type":"submit","id":"x","config":'
                                                          '{"output_name":"\\ud800"}}'),
]


def _safetensors_of(tensors):
    import tempfile

    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        save_file(tensors, f"{tmp}/f.safetensors")
        return Path(f"{tmp}/f.safetensors").read_bytes()


def _pickle_payload() -> bytes:
    import io

    import torch

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {PWNED}",))

    buf = io.BytesIO()
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Payload()}, buf)
    return buf.getvalue()


def model_file(name: str, make):
    def change(ctx):
        path = ctx.readable / "models" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(make(ctx))
        return {"base_model": str(path)}

    return change


def llm_folder(ctx, how: str) -> dict:
    """A copy of the tiny LLaMA broken in one way, as an LLM config's base_model."""
    import torch
    from safetensors.torch import load_file

    folder = ctx.readable / f"llm-{how}"
    if not folder.exists():
        shutil.copytree(ctx.tiny_llama, folder)
        if how == "pickle":
            class Payload:
                def __reduce__(self):
                    return (os.system, (f"touch {PWNED}",))

            weights = {**load_file(str(folder / "model.safetensors")), "payload": Payload()}
            (folder / "model.safetensors").unlink()
            torch.save(weights, str(folder / "pytorch_model.bin"))
        elif how == "remote":
            config = json.loads((folder / "config.json").read_text())
            config.update(model_type="evilgpt", auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
            (folder / "config.json").write_text(json.dumps(config))
            (folder / "modeling_evil.py").write_text(f"import os\nos.system('touch {PWNED}')\n")
        else:
            (folder / "config.json").unlink()
    return {"_llm": True, "base_model": str(folder)}


CLI = [
    Case("not a checkpoint", "cli", "text.safetensors", model_file("text.safetensors", lambda ctx: b"hello " * 50)),
    Case("empty checkpoint", "cli", "empty.safetensors", model_file("empty.safetensors", lambda ctx: b"")),
    Case("truncated safetensors", "cli", "cut.safetensors", model_file(
        "cut.safetensors", lambda ctx: ctx.tiny_sd["safetensors"].read_bytes()[: ctx.tiny_sd["safetensors"].stat().st_size // 2])),
    Case("truncated ckpt", "cli", "cut.ckpt", model_file(
        "cut.ckpt", lambda ctx: ctx.tiny_sd["ckpt"].read_bytes()[: ctx.tiny_sd["ckpt"].stat().st_size // 3])),
    Case("ckpt with a pickle payload", "cli", "evil.ckpt", model_file("evil.ckpt", lambda ctx: _pickle_payload())),
    Case("checkpoint of another model", "cli", "not a Stable Diffusion checkpoint", model_file(
        "other.safetensors", lambda ctx: _safetensors_of({"encoder.weight": __import__("torch").zeros(2)}))),
    Case("transformer (Flux-style) checkpoint", "cli", "transformer", model_file(
        "flux.safetensors", lambda ctx: _safetensors_of({"double_blocks.0.img_attn.qkv.weight": __import__("torch").zeros(2)}))),
    Case("LLM weights (.bin) with a pickle payload", "cli", "could run code", lambda ctx: llm_folder(ctx, "pickle")),
    Case("LLM with its own model code, not trusted", "cli", "trust_remote_code", lambda ctx: llm_folder(ctx, "remote")),
    Case("LLM folder without config.json", "cli", "config.json", lambda ctx: llm_folder(ctx, "no_config")),
    Case("config file is not YAML", "cli", "is not valid YAML", lambda ctx: {"_yaml": "base_model: [unclosed\n"}),
    Case("config file missing", "cli", "config file not found", lambda ctx: {"_yaml": None}),
]

CATALOGUE = SUBMIT + RAW + CLI


class Ctx:
    pass


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, tiny_sd, tiny_llama):
    from shared.fixtures.images import make_image_folder

    c = Ctx()
    c.tiny_sd = tiny_sd
    c.tiny_llama = tiny_llama
    c.readable = tmp_path_factory.mktemp("bad_inputs_read")
    c.allowed = tmp_path_factory.mktemp("bad_inputs_write")
    c.outside = Path(str(tmp_path_factory.getbasetemp()) + "-outside")  # under neither root
    c.images = make_image_folder(c.readable / "images", count=2)
    c.daemon = DaemonProcess(c.allowed.parent / f"{c.allowed.name}-state", [c.readable, tiny_sd["safetensors"].parent],
                             [c.allowed]).start()
    yield c
    c.daemon.stop()
    shutil.rmtree(c.outside, ignore_errors=True)


def good_config(ctx, case_dir: Path) -> dict:
    return {"base_model": str(ctx.tiny_sd["safetensors"]), "model_config": str(ctx.tiny_sd["config"]),
            "train_data_dir": str(ctx.images), "output_dir": str(case_dir / "out"), "output_name": "case",
            "deploy_dir": str(case_dir / "Lora"), "resolution": 64, "batch_size": 1, "max_train_steps": 1}


def one_line_naming(message: str, expect: str) -> bool:
    return "\n" not in message.strip() and expect in message


@pytest.mark.parametrize("case", CATALOGUE, ids=[c.id for c in CATALOGUE])
def test_bad_input_is_refused_with_one_clear_line_and_nothing_written(case, ctx, capsys, record):
    case_dir = ctx.allowed / case.id.replace(" ", "_").replace("/", "_")
    config = good_config(ctx, case_dir)
    change = case.change(ctx) if callable(case.change) else case.change
    submit_args = {}
    if isinstance(change, dict) and change.pop("_llm", False):
        from shared.fixtures.tiny_llm import write_instruction_data

        config = {"train_data_dir": str(write_instruction_data(ctx.readable / "chat.jsonl", "chat")),
                  "output_dir": str(case_dir / "out"), "deploy_dir": str(case_dir / "Lora"),
                  "max_train_steps": 1, "max_seq_len": 64, "device": "cpu"}
    if isinstance(change, dict):
        for key, value in change.items():
            if key.startswith("_"):
                submit_args[key[1:]] = value
            elif value is None:
                config.pop(key, None)
            else:
                config[key] = value
    _refused[case.id] = False
    try:
        check(case, ctx, config, change, submit_args, case_dir, capsys)
        _refused[case.id] = True
    finally:
        record("bad_inputs", tried=len(_refused), refused_cleanly=sum(_refused.values()),
               via_submit=len(SUBMIT), via_raw_frames=len(RAW), via_cli=len(CLI),
               not_refused_cleanly=sorted(k for k, v in _refused.items() if not v))


def check(case, ctx, config, change, submit_args, case_dir, capsys):
    if case.via == "cli":
        from daemon.cli import main

        path = case_dir / "config.yaml"
        case_dir.mkdir(parents=True, exist_ok=True)
        if "yaml" in submit_args:
            if submit_args["yaml"] is not None:
                path.write_text(submit_args["yaml"])
        else:
            import yaml

            path.write_text(yaml.safe_dump(config))
        code = main(["train", "--config", str(path)])
        err = capsys.readouterr().err.strip()
        assert code == 2, err
        assert err.startswith("error: ") and one_line_naming(err, case.expect), err
        assert not os.path.exists(PWNED)
    else:
        with ctx.daemon.client() as client:
            with pytest.raises(DaemonError) as refused:
                if case.via == "raw":
                    frame = change if isinstance(change, str) else json.dumps(
                        {"v": 1, "type": "submit", "id": "x", "config": config, **change})
                    client.send_raw(frame)
                    reply = client._recv(10)
                    while reply.get("type") == "heartbeat":
                        reply = client._recv(10)
                    assert reply["type"] == "error", reply
                    raise DaemonError(reply["code"], reply["message"], reply.get("field"))
                client.submit(config, source="case.yaml", **submit_args)
            assert refused.value.code in ("invalid_config", "path_not_allowed", "bad_message", "bad_json")
            assert one_line_naming(str(refused.value), case.expect), str(refused.value)
            assert client.jobs() == []
    assert not (case_dir / "out").exists() and not (case_dir / "Lora").exists()
    assert not ctx.outside.exists()


def test_pickle_ckpt_refusal_does_not_suggest_the_unsafe_load(tmp_path):
    from shared.errors import ModelError
    from shared.sd.base_model import read_checkpoint

    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(_pickle_payload())
    with pytest.raises(ModelError) as refused:
        read_checkpoint(evil)
    assert not os.path.exists(PWNED)
    assert "weights_only" not in str(refused.value) and "could run code" in str(refused.value)
