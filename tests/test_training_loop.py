"""The one training loop, run for each task: a stop then `resume: latest` ends where an unbroken run
ends, keep-last-N keeps N states, every task streams the same events, and the modules stay apart
(no import cycle in shared/, no family imports another)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shared.preflight import load_config
from shared.train import run_training
from shared.training import state as states
from shared.training.events import EVENTS, METRICS, send
from tests.llm_fixtures import PAIRS, llm_config
from tests.test_llm_training import Recorder  # events and log lines; stop_at asks to stop after that step

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO / "shared"

# Both tasks: two micro-batches per step and dropout on, so a resume must restore the position inside
# an epoch and the RNG behind the dropout masks, not only the weights.
COMMON = dict(max_train_steps=6, batch_size=2, gradient_accumulation_steps=2, lora_dropout=0.1, save_steps=0)
LLM_ONLY = dict(learning_rate=5e-3, sample_prompts=[PAIRS[0][0]], sample_max_tokens=4)
# Flux: a step large enough that the dropout masks (through the LoRA) show in the next losses
FLUX_ONLY = dict(learning_rate=2e-2)


@pytest.fixture(params=["sd", "flux", "llm"])
def job(request, tmp_path):
    """job(name, **overrides) -> a TrainConfig of the tiny model of the task, writing to tmp/name/job."""
    if request.param in ("sd", "flux"):
        image_config = request.getfixturevalue(f"{request.param}_config")

        extra = FLUX_ONLY if request.param == "flux" else {}

        def make(name, **overrides):
            return load_config(image_config(output_dir=tmp_path / name / "job", **{**COMMON, **extra, **overrides}))
    else:
        tiny_llama, chat_data = request.getfixturevalue("tiny_llama"), request.getfixturevalue("chat_data")

        def make(name, **overrides):
            return llm_config(tiny_llama, chat_data, tmp_path / name / "job", **{**COMMON, **LLM_ONLY, **overrides})
    make.task = request.param
    return make


def adapter(path: Path) -> dict:
    return load_file(str(path if path.suffix else path / "adapter_model.safetensors"))


def test_stop_then_resume_equals_an_unbroken_run(job, tmp_path):
    whole = run_training(job("whole"))
    stopped = run_training(job("parts"), Recorder(stop_at=3))
    assert stopped.stopped_early and stopped.steps == 3
    checkpoints = tmp_path / "parts" / "job" / "checkpoints"
    assert [s for s, _ in states.list_states(checkpoints)] == [3]  # the stop saved a state
    saved = json.loads((checkpoints / "state-step000003" / "trainer.json").read_text())
    assert (saved["epoch"], saved["next_batch"]) == (1, 2)  # mid-epoch: 3 micro-batches make 2 steps per epoch

    rec = Recorder()
    resumed = run_training(job("parts", resume="latest"), rec)
    assert f"Resumed from {checkpoints / 'state-step000003'} at step 3" in rec.lines
    assert [d["step"] for k, d in rec.events if k == "started"] == [3]
    assert resumed.steps == whole.steps == 6
    assert resumed.losses == pytest.approx(whole.losses, rel=1e-4)
    a, b = adapter(whole.output_path), adapter(resumed.output_path)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key].float(), a[key].float(), rtol=1e-4, atol=1e-6)

    # control: resuming with the RNG of another moment (dropout masks drawn afresh) ends elsewhere
    rng = checkpoints / "state-step000003" / "rng.pt"
    torch.save({"ranks": [{"torch": torch.Generator().manual_seed(1).get_state()}]}, rng)
    other = run_training(job("parts", resume="latest"))
    assert other.losses[3:] != pytest.approx(whole.losses[3:], rel=1e-4)


def test_save_last_n_keeps_two_states_and_two_checkpoints(job, tmp_path):
    result = run_training(job("keep", save_steps=1, save_last_n=2, gradient_accumulation_steps=1))
    checkpoints = tmp_path / "keep" / "job" / "checkpoints"
    assert [s for s, _ in states.list_states(checkpoints)] == [4, 5]  # saved at 1..5; step 6 is the end
    suffix = "" if job.task == "llm" else ".safetensors"
    assert sorted(p.name for p in checkpoints.iterdir() if not p.name.startswith("state-")) == [
        f"job-step000004{suffix}", f"job-step000005{suffix}"]
    assert [p.name for p in result.checkpoints] == [f"job-step00000{n}{suffix}" for n in range(1, 6)]
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")]  # no temporaries left
    assert adapter(checkpoints / f"job-step000005{suffix}").keys() == adapter(result.output_path).keys()


def test_sd_and_llm_jobs_stream_the_same_events(sd_config, tiny_llama, chat_data, tmp_path):
    shared_keys = dict(max_train_steps=4, save_steps=2, sample_every_n_steps=2, batch_size=2, lora_dropout=0.0,
                       evaluation=True)
    streams = {}
    for task in ("sd", "llm"):
        rec = Recorder()
        if task == "sd":
            cfg = load_config(sd_config(output_dir=tmp_path / "sd" / "job", sample_prompts=["a red circle"],
                                        sample_steps=2, **shared_keys))
        else:
            cfg = llm_config(tiny_llama, chat_data, tmp_path / "llm" / "job", sample_prompts=[PAIRS[0][0]],
                             sample_max_tokens=4, **shared_keys)
        run_training(cfg, rec)
        streams[task] = rec.events
    # verdicts follow each task's own scores (a 4-step LoRA may well have no effect yet): apart from them,
    # the same kinds in the same order
    kinds = {task: [k for k, _ in events if k != "verdict"] for task, events in streams.items()}
    assert kinds["sd"] == kinds["llm"]
    assert kinds["sd"] == ["memory_plan", "buckets", "cached", "started", "progress", "progress", "checkpoint",
                           "evaluation", "sample", "progress", "progress", "sample", "evaluation", "finished"]
    fields = {task: {k: sorted(d) for k, d in events} for task, events in streams.items()}
    # `verdict` only where the scores find one, `compiled` only with compile: true (tests/test_speed_defaults.py)
    assert fields["sd"].keys() - {"verdict"} == fields["llm"].keys() - {"verdict"} == EVENTS.keys() - {"verdict", "compiled"}
    for task in streams:
        assert all(fields[task][k] == sorted(EVENTS[k]) for k in fields[task]), task
    for task, events in streams.items():
        [checkpoint] = [d for k, d in events if k == "checkpoint"]
        assert Path(checkpoint["state"]).name == "state-step000002" and Path(checkpoint["path"]).exists(), task
        assert [d["step"] for k, d in events if k == "sample"] == [2, 4], task
        assert all(Path(p).is_file() for k, d in events if k == "sample" for p in d["paths"]), task
    assert [len(d["texts"]) for k, d in streams["llm"] if k == "sample"] == [1, 1]  # the answers travel too


def test_an_event_with_other_fields_is_refused():
    rec = Recorder()
    send(rec, "checkpoint", step=1, path="x", state="y", **dict.fromkeys(METRICS, 1.0))
    with pytest.raises(ValueError, match="unexpected fields"):
        send(rec, "progress", step=1, total=2, loss=0.1, lr=0.1, it_s=1.0, eta_s=1.0, note="x")
    with pytest.raises(ValueError, match="missing"):
        send(rec, "started", total=3)
    assert [k for k, _ in rec.events] == ["checkpoint"]


# --- module structure -------------------------------------------------------------------------------

def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST, name: str, is_package: bool) -> set[str]:
    """The shared.* modules `tree` (module `name`) imports, at module level or inside functions (a
    function-local import only delays the cycle it closes). Relative imports (the thin client's
    modules use them, so the hosts can load them under another package name) count as absolute."""
    found = set()
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            for alias in node.names:  # `from shared.sd import task` imports the module shared.sd.task
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in _MODULES else base)
    return found & _MODULES


_FILES = {_module_name(p): p for p in SHARED.rglob("*.py")}
_MODULES = set(_FILES)


def _graph() -> dict[str, set[str]]:
    return {name: _imports(ast.parse(path.read_text(encoding="utf-8")), name, path.name == "__init__.py")
            for name, path in _FILES.items()}


def test_no_import_cycle_in_shared():
    """Counting imports inside functions too: today's main hides shared.train -> shared.distributed ->
    shared.train in function-local imports."""
    graph = _graph()
    assert graph["shared.train"] >= {"shared.training.launch", "shared.training.ranks"}  # the walk sees imports
    visiting, done, cycles = [], set(), []

    def walk(node):
        if node in visiting:
            cycles.append(visiting[visiting.index(node):] + [node])
            return
        if node in done:
            return
        visiting.append(node)
        for nxt in sorted(graph[node]):
            walk(nxt)
        visiting.pop()
        done.add(node)

    for name in sorted(graph):
        walk(name)
    assert not cycles, cycles


FAMILIES = ("shared.sd", "shared.llm", "shared.flux")


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_no_family_imports_another_and_the_loop_imports_none():
    """SD, LLM and Flux never import one another; the loop and what the image families share
    (shared/images) import none of them."""
    graph = _graph()
    assert graph["shared.flux.task"] & {m for m in _MODULES if _in(m, "shared.images")}  # the walk sees them
    for name, imported in graph.items():
        for family in FAMILIES:
            if _in(name, family):
                others = {m for m in imported for f in FAMILIES if f != family and _in(m, f)}
                assert not others, (name, others)
        if name == "shared.train" or _in(name, "shared.training") or _in(name, "shared.images"):
            assert not {m for m in imported for f in FAMILIES if _in(m, f)}, name


def test_a_job_imports_only_its_own_family(sd_config, flux_config, tiny_llama, chat_data, tmp_path):
    """In a fresh process: an LLM job loads nothing of shared.sd or shared.flux (nor diffusers), an SD job
    nothing of shared.llm or shared.flux, a Flux job nothing of shared.sd or shared.llm."""
    llm = tmp_path / "llm.json"
    llm.write_text(json.dumps(llm_config(tiny_llama, chat_data, tmp_path / "llm" / "job", max_train_steps=1,
                                         sample_prompts=None, sample_max_tokens=1).to_dict()))
    sd = tmp_path / "sd.json"
    sd.write_text(json.dumps(load_config(sd_config(max_train_steps=1, preview=False)).to_dict()))
    flux = tmp_path / "flux.json"
    flux.write_text(json.dumps(load_config(flux_config(max_train_steps=1, output_dir=tmp_path / "flux" / "job"))
                               .to_dict()))
    script = ("import json, sys\nfrom shared.config import config_from_dict\nfrom shared.reporting import Reporter\n"
              "from shared.train import run_training\n"
              "run_training(config_from_dict(json.load(open(sys.argv[1]))), Reporter())\n"
              "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('shared.', 'diffusers')))))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    procs = {task: subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
             for task, path in (("llm", llm), ("sd", sd), ("flux", flux))}  # side by side: mostly imports
    loaded = {}
    for task, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        loaded[task] = set(json.loads(out.strip().splitlines()[-1]))
    assert "shared.llm.task" in loaded["llm"] and "shared.sd.task" in loaded["sd"] and "shared.flux.task" in loaded["flux"]
    assert not {m for m in loaded["llm"] if m.startswith(("shared.sd", "shared.flux", "diffusers"))}
    assert not {m for m in loaded["sd"] if m.startswith(("shared.llm", "shared.flux"))}
    assert not {m for m in loaded["flux"] if m.startswith(("shared.llm", "shared.sd"))}
