"""The LoRA tools as daemon jobs: queued like training, run in a worker with progress events, the output
published under the never-overwrite rules and named in the result; every input and output path confined
before anything is opened; `python -m daemon lora ... --daemon` submits the same job."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from daemon_harness import REPO, DaemonProcess, collect

from shared.client import DaemonError
from shared.sd.lora_file import read_lora


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory, tiny_sd):
    """A rank-4 LoRA with random up-weights on kohya's targets of the tiny SD1.5 (the UNet only)."""
    from shared.images.lora import inject_lora, kohya_unet_targets
    from shared.sd.base_model import load_sd_model
    from shared.sd.kohya_export import lora_metadata, model_lora_tensors, save_lora_file

    model = load_sd_model(tiny_sd["safetensors"], tiny_sd["config"])
    torch.manual_seed(0)
    inject_lora(model.unet, kohya_unet_targets(model.unet), rank=4, alpha=4, dropout=0.0, init="default")
    with torch.no_grad():
        for name, p in model.unet.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("daemon_loras") / "shapes.safetensors"
    meta = lora_metadata(arch="sd1", output_name="shapes", rank=4, alpha=4, base_model=tiny_sd["safetensors"],
                         resolution=64, training={})
    save_lora_file(path, model_lora_tensors("sd1", model.unet, []), meta)
    return path


@pytest.fixture
def daemon(tmp_path, tmp_path_factory):
    proc = DaemonProcess(tmp_path / "state", [tmp_path_factory.getbasetemp()], [tmp_path / "writable"]).start()
    yield proc
    proc.stop()


def test_a_resize_job_writes_a_new_file_and_reports_progress(daemon, lora_file, tmp_path):
    out = tmp_path / "writable" / "loras"
    before = lora_file.read_bytes()
    with daemon.client() as client:
        job = client.submit({"file": str(lora_file), "rank": 2, "out_dir": str(out)}, kind="lora_resize")
        assert (job["task"], job["state"], job["name"]) == ("lora_resize", "queued", "resize-shapes-rank2")
        events = collect(client, job["id"])
        again = collect(client, client.submit({"file": str(lora_file), "rank": 2, "out_dir": str(out)},
                                              kind="lora_resize")["id"])
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "queued" and kinds[1] == "started" and kinds[-1] == "finished", events[-1]
    progress = [e["data"] for e in events if e["kind"] == "progress"]
    assert progress[-1]["step"] == progress[-1]["total"] == events[1]["data"]["total"] > 1
    assert all(p["what"].startswith("lora_unet_") for p in progress) and len(progress) <= 101
    result = events[-1]["data"]
    assert result["output"] == str(out / "shapes-rank2.safetensors") and result["summary"].endswith(result["output"])
    assert 0 < result["kept_energy"] < 1 and {tuple(v[:2]) for v in result["modules"].values()} == {(4, 2)}
    resized = read_lora(out / "shapes-rank2.safetensors")
    assert {m.rank for m in resized.modules.values()} == {2}
    assert again[-1]["data"]["output"] == str(out / "shapes-rank2_2.safetensors")  # never over the first
    assert lora_file.read_bytes() == before


@pytest.fixture
def outside():
    """A file outside the daemon's read roots (which hold all of pytest's temporary folders)."""
    with tempfile.TemporaryDirectory(prefix="lora-daemon-outside-") as folder:
        path = Path(folder) / "secret.safetensors"
        path.write_bytes(b"SECRET")
        yield path


def test_tool_jobs_refuse_paths_outside_the_roots_and_bad_options(daemon, lora_file, outside, tmp_path):
    writable = str(tmp_path / "writable")
    with daemon.client() as client:
        cases = [
            # the input outside the read roots: refused before it is looked at (no "does not exist" either)
            ({"file": str(outside), "rank": 2, "out_dir": writable}, "lora_resize", "path_not_allowed", "config.file"),
            ({"file": str(outside.parent / "missing.safetensors")}, "lora_info", "path_not_allowed", "config.file"),
            # the default output folder is the input's, which this daemon may only read
            ({"file": str(lora_file), "rank": 2}, "lora_resize", "path_not_allowed", "config.out_dir"),
            ({"loras": [f"{lora_file}:0.5", f"{outside}:0.5"], "out_dir": writable}, "lora_merge",
             "path_not_allowed", "config.loras"),
            ({"file": str(lora_file), "rank": 2, "energy": 0.9, "out_dir": writable}, "lora_resize",
             "invalid_config", "config"),
            ({"file": str(lora_file), "ranks": 2}, "lora_resize", "invalid_config", "config"),
            ({"file": str(lora_file), "to": "onnx", "out_dir": writable}, "lora_convert", "invalid_config", "config"),
            ({"file": str(lora_file)}, "lora_shrink", "bad_message", "kind"),
        ]
        for options, kind, code, field in cases:
            with pytest.raises(DaemonError) as err:
                client.submit(options, kind=kind)
            assert (err.value.code, err.value.field) == (code, field), (kind, options, str(err.value))
            assert "SECRET" not in str(err.value) and "does not exist" not in str(err.value)
        assert client.jobs() == []
    assert not (tmp_path / "writable").exists()


def test_info_and_merge_through_the_cli_with_daemon(daemon, lora_file, tmp_path):
    """`lora info --daemon` prints what the local command prints; `lora merge --daemon` with relative paths."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def cli(*args, cwd=REPO):
        return subprocess.run([sys.executable, "-m", "daemon", "lora", *args, "--daemon", "--state-dir",
                               str(daemon.state_dir), "--port", str(daemon.port)], capture_output=True, text=True,
                              cwd=cwd, env=env, timeout=180)

    info = cli("info", str(lora_file))
    local = subprocess.run([sys.executable, "-m", "daemon", "lora", "info", str(lora_file)], capture_output=True,
                           text=True, cwd=REPO, env=env, timeout=180)
    assert info.returncode == 0, info.stderr
    assert info.stdout == local.stdout and "rank: 4" in info.stdout
    out = tmp_path / "writable" / "merged"
    merged = cli("merge", f"{lora_file.name}:0.5", f"{lora_file.name}:0.5", "--out", str(out), cwd=lora_file.parent)
    assert merged.returncode == 0, merged.stderr
    assert "submitted job" in merged.stderr and f"wrote {out / 'shapes-merged.safetensors'}" in merged.stderr
    lora = read_lora(out / "shapes-merged.safetensors")
    assert {m.rank for m in lora.modules.values()} == {8}  # concat: 4 + 4
    refused = cli("resize", str(lora_file), "--rank", "2")  # beside the input: not writable for this daemon
    assert refused.returncode == 2 and "out_dir:" in refused.stderr and "outside the folders" in refused.stderr
