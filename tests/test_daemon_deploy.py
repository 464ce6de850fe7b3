"""`python -m daemon deploy JOB --checkpoint N`: a saved checkpoint of a finished job, published into the
job's deploy folders beside its last LoRA, through the real daemon and its CLI."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from daemon_harness import REPO, collect
from test_daemon_jobs import cli_for, daemon, submit_yaml  # noqa: F401 - `daemon` is the fixture

from daemon.deploy import deploy_checkpoint
from daemon.protocol import ProtocolError
from shared.client import DaemonError
from shared.roots import Roots


def run_cli(daemon, *args):  # noqa: F811 - the fixture's value
    return subprocess.run(cli_for(daemon)(*args), capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_deploy_publishes_a_saved_checkpoint_with_its_name_notes_and_preview(daemon, sd_config, tmp_path):  # noqa: F811
    from safetensors import safe_open

    lora_dir = tmp_path / "Lora"
    config = sd_config(max_train_steps=8, save_steps=4, output_name="dep", deploy_dir=lora_dir, evaluation=True,
                       sample_steps=4, eval_sample_steps=4, cache_latents="memory")
    with daemon.client() as client:
        job = submit_yaml(client, config)
        collect(client, job["id"])
        final = client.get(job["id"])
    assert final["state"] == "finished", final
    result = final["result"]
    # no eval loss and no collapse: the last is the best
    assert result["best_checkpoint"]["step"] == 8 and result["best_checkpoint"]["final"]
    assert Path(result["report"]).is_file()

    done = run_cli(daemon, "deploy", job["id"], "--checkpoint", "4")
    assert done.returncode == 0, done.stderr
    landed = lora_dir / "dep-step000004.safetensors"
    assert f"deployed the checkpoint of step 4 to {landed} (use it as <lora:dep-step000004:0.8>)" in done.stdout
    with safe_open(str(landed), "pt") as f, safe_open(result["checkpoints"][0], "pt") as g:
        assert f.metadata()["ss_output_name"] == "dep-step000004"  # what the host shows
        assert set(f.keys()) == set(g.keys()) and all(f.get_tensor(k).equal(g.get_tensor(k)) for k in f.keys())
    notes = json.loads((lora_dir / "dep-step000004.json").read_text())["notes"]
    assert notes.startswith(f"The checkpoint of step 4 of 8 (lora-daemon job {job['id']})")
    assert (lora_dir / "dep-step000004.preview.png").is_file()  # the evaluation's picture of step 4

    again = run_cli(daemon, "deploy", job["id"], "--checkpoint", "4")  # a second copy: a new name, nothing overwritten
    assert again.returncode == 0 and "dep-step000004_2.safetensors" in again.stdout
    assert sorted(p.name for p in lora_dir.iterdir()) == sorted(
        f"{stem}{suffix}" for stem in ("dep", "dep-step000004", "dep-step000004_2")
        for suffix in (".safetensors", ".json", ".preview.png"))

    missing = run_cli(daemon, "deploy", job["id"], "--checkpoint", "3")
    assert missing.returncode != 0 and "has no checkpoint of step 3" in missing.stderr and "steps 4" in missing.stderr
    with daemon.client() as client, pytest.raises(DaemonError, match="already deployed") as err:
        client.deploy(job["id"])  # the default, the best, is the last: already in the Lora folder
    assert err.value.code == "bad_state"


def test_deploy_defaults_to_the_best_checkpoint_and_checks_the_roots(tmp_path):
    """The daemon's deploy on a stored job whose evaluation named an earlier checkpoint as the best."""
    out = tmp_path / "out" / "over"
    (out / "checkpoints").mkdir(parents=True)
    header = json.dumps({"__metadata__": {"ss_output_name": "over"}, "w": {"dtype": "F32", "shape": [2],
                                                                            "data_offsets": [0, 8]}}).encode()
    for step in (25, 50):
        path = out / "checkpoints" / f"over-step{step:06d}.safetensors"
        path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(range(step % 7, step % 7 + 8)))
    lora_dir = tmp_path / "Lora"
    job = {"id": "j1", "state": "finished",
           "spec": {"config": {"output_dir": str(out), "deploy_dir": str(lora_dir)}},
           "result": {"steps": 75, "lora": str(out / "over.safetensors"),
                      "best_checkpoint": {"step": 25, "final": False, "by": "eval_loss"}}}
    step, [path] = deploy_checkpoint(job, None, Roots(read=[tmp_path], write=[tmp_path]))
    assert step == 25 and path == lora_dir / "over-step000025.safetensors"
    assert path.read_bytes()[-8:] == (out / "checkpoints" / "over-step000025.safetensors").read_bytes()[-8:]
    with pytest.raises(ProtocolError, match="deploy_dir") as err:  # the Lora folder is no longer allowed
        deploy_checkpoint(job, None, Roots(read=[tmp_path], write=[out]))
    assert err.value.code == "path_not_allowed"
    with pytest.raises(ProtocolError, match="running"):
        deploy_checkpoint({**job, "state": "running"}, None, Roots(read=[tmp_path], write=[tmp_path]))
