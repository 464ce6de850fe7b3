"""Issue 18's defaults: mixed precision resolved per device with the base stored in the compute type,
weights streamed into it, caches on whenever they train the same numbers (and what they replaced
freed), fused AdamW, and the opt-in compile."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shared.preflight import load_config
from shared.reporting import Reporter
from shared.training import precision as precisions
from shared.training.precision import resolve_mixed_precision


class Events(Reporter):
    def __init__(self):
        self.lines, self.events = [], []

    def log(self, message):
        self.lines.append(message)

    def event(self, kind, **data):
        self.events.append((kind, data))

    def first(self, kind):
        return next(data for k, data in self.events if k == kind)


@pytest.mark.parametrize("has_bf16, expected", [(True, "bf16"), (False, "no")])
def test_auto_precision_on_the_cpu_follows_its_bf16_arithmetic(monkeypatch, has_bf16, expected):
    monkeypatch.setattr(precisions, "cpu_has_bf16", lambda: has_bf16)
    assert resolve_mixed_precision("auto", "cpu") == expected
    assert resolve_mixed_precision("auto", "mps") == "no"
    assert resolve_mixed_precision("auto", "xpu") == "bf16"
    for explicit in ("no", "fp16", "bf16"):  # the config's own choice is kept
        assert resolve_mixed_precision(explicit, "cpu") == explicit


def test_auto_precision_on_cuda_is_bf16_or_fp16_with_a_scaler(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_mixed_precision("auto", "cuda:1") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_mixed_precision("auto", "cuda") == "fp16"


def test_cpu_bf16_is_read_from_the_cpu_flags(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile\n")
    real_path = precisions.Path
    monkeypatch.setattr(precisions, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else real_path(p))
    precisions.cpu_has_bf16.cache_clear()
    try:
        assert precisions.cpu_has_bf16()
        cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
        precisions.cpu_has_bf16.cache_clear()
        assert not precisions.cpu_has_bf16()
    finally:
        precisions.cpu_has_bf16.cache_clear()


def test_a_default_job_resolves_every_auto_and_logs_why(sd_config, monkeypatch):
    from shared.train import run_training

    monkeypatch.setattr(precisions, "cpu_has_bf16", lambda: True)
    events = Events()
    result = run_training(load_config(sd_config(save_steps=2)), events)
    assert any(line.startswith("mixed_precision auto: bf16") for line in events.lines)
    assert any(line.startswith("cache_latents auto: memory") for line in events.lines)
    assert any(line.startswith("cache_text_encoder_outputs auto: yes") for line in events.lines)
    assert any("Freed the VAE encoder and the text encoders" in line for line in events.lines)
    assert events.first("cached") == {"latents": True, "text": True}
    from safetensors import safe_open

    with safe_open(result.output_path, "pt") as fh:
        meta = fh.metadata()
        assert meta["ss_mixed_precision"] == "bf16" and meta["ss_cache_latents"] == "True"
    import torch
    from safetensors.torch import load_file

    # the trained weights and the optimizer state stay fp32 under bf16 (the adapter file is saved as fp16)
    state = Path(events.first("checkpoint")["state"])
    assert {t.dtype for t in load_file(str(state / "lora.safetensors")).values()} == {torch.float32}
    moments = torch.load(str(state / "optimizer.pt"), weights_only=True)["state"].values()
    assert {m["exp_avg"].dtype for m in moments} == {torch.float32}
    assert Path(result.outputs["lora"]).with_suffix(".preview.png").is_file()  # rendered without the encoders


def test_auto_caches_stay_off_where_they_would_change_the_training(sd_config):
    from shared.train import run_training

    events = Events()
    run_training(load_config(sd_config(random_crop=True, shuffle_caption=True, max_train_steps=1, preview=False)),
                 events)
    assert events.first("cached") == {"latents": False, "text": False}
    assert any("cache_latents auto: no (random_crop" in line for line in events.lines)
    assert any("cache_text_encoder_outputs auto: no (shuffle_caption" in line for line in events.lines)


def test_an_explicit_cache_that_cannot_hold_is_refused_and_yaml_booleans_still_work(sd_config):
    from shared.errors import ConfigError

    with pytest.raises(ConfigError, match="cache_text_encoder_outputs.*set the cache to auto"):
        load_config(sd_config(cache_text_encoder_outputs=True, shuffle_caption=True))
    with pytest.raises(ConfigError, match="cache_latents keeps one crop.*cache_latents: auto"):
        load_config(sd_config(cache_latents="memory", random_crop=True))
    assert load_config(sd_config(cache_text_encoder_outputs=True)).cache_text_encoder_outputs == "yes"
    assert load_config(sd_config(cache_text_encoder_outputs=False)).cache_text_encoder_outputs == "no"


def test_the_base_loads_straight_into_its_storage_type(tiny_sd, tmp_path):
    import torch

    from shared.sd.base_model import load_sd_model

    model = load_sd_model(tiny_sd["safetensors"], tiny_sd["config"], dtype=torch.bfloat16)
    for module in (model.unet, model.vae, *model.text_encoders):
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    fp32 = load_sd_model(tiny_sd["safetensors"], tiny_sd["config"])
    a, b = dict(model.unet.named_parameters()), dict(fp32.unet.named_parameters())
    assert all(torch.equal(a[k], b[k].to(torch.bfloat16)) for k in b)  # the same weights, rounded once

    folder = tmp_path / "diffusers"
    from shared.sd.sampling import build_pipeline

    build_pipeline(fp32).save_pretrained(folder)
    loaded = load_sd_model(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.unet.parameters()} == {torch.bfloat16}
    c = dict(loaded.text_encoders[0].named_parameters())
    d = dict(fp32.text_encoders[0].named_parameters())
    assert set(c) == set(d) and all(torch.equal(c[k], d[k].to(torch.bfloat16)) for k in d)


def test_a_bf16_load_keeps_the_sdxl_vae_in_fp32_without_a_bf16_round_trip(tiny_sdxl):
    import torch

    from shared.sd.base_model import load_sd_model

    kwargs = {"model_config": tiny_sdxl["config"]} if "config" in tiny_sdxl else {}
    bf16 = load_sd_model(tiny_sdxl["safetensors"], dtype=torch.bfloat16, **kwargs)
    fp32 = load_sd_model(tiny_sdxl["safetensors"], **kwargs)
    assert {p.dtype for p in bf16.unet.parameters()} == {torch.bfloat16}
    a, b = dict(bf16.vae.named_parameters()), dict(fp32.vae.named_parameters())
    assert {p.dtype for p in a.values()} == {torch.float32}
    assert all(torch.equal(a[k], b[k]) for k in b)  # the file's VAE weights exactly, not rounded to bf16


def test_the_sdxl_vae_stays_fp32_as_its_config_asks():
    import torch

    from shared.sd.base_model import vae_storage

    assert vae_storage({"force_upcast": True}, torch.bfloat16) == torch.float32
    assert vae_storage({}, torch.bfloat16) == torch.bfloat16


def test_streaming_a_checkpoint_into_bf16_never_holds_it_whole(tmp_path):
    """A fresh process reads a 192 MB fp32 file into bf16: its peak RSS grows by about the bf16 copy
    (96 MB) and one tensor, not by the file plus the copy as a memory-mapped read does."""
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "big.safetensors"
    torch.manual_seed(0)
    save_file({f"w{i}": torch.randn(1024, 1024) for i in range(48)}, str(path))  # 48 x 4 MiB
    script = f"""
import json, resource, sys, torch
from shared.weight_files import stream_safetensors
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
before = hwm()
state = stream_safetensors({str(path)!r}, lambda k, t: t.to(torch.bfloat16))
print(json.dumps({{"grew": hwm() - before, "n": len(state), "dtype": str(state["w0"].dtype)}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["n"] == 48 and result["dtype"] == "torch.bfloat16"
    assert result["grew"] < 96 + 40, result  # the bf16 copy, one 4 MiB buffer, allocator slack


def test_streamed_tensors_equal_safetensors_own_reader(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from shared.weight_files import stream_safetensors

    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.zeros(0, 4),
               "d": torch.randn(2, 2).to(torch.bfloat16), "e": torch.randn(4).to(torch.float16)}
    save_file(tensors, str(tmp_path / "t.safetensors"), metadata={"x": "y"})
    streamed, reference = stream_safetensors(tmp_path / "t.safetensors"), load_file(str(tmp_path / "t.safetensors"))
    assert set(streamed) == set(reference)
    assert all(streamed[k].dtype == reference[k].dtype and torch.equal(streamed[k], reference[k]) for k in reference)


def test_adamw_uses_the_fused_kernel(sd_config):
    import torch

    from shared.training.optim import build_optimizer

    cfg = load_config(sd_config())
    params = [torch.nn.Parameter(torch.zeros(3))]
    optimizer = build_optimizer(cfg, [{"params": params, "lr": 1e-3}], 10)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is True


def test_compile_trains_the_same_adapter_and_reports_its_warm_up(sd_config, tmp_path, monkeypatch):
    import torch

    from shared.train import run_training

    # inductor's code generation takes minutes for the UNet on this CPU (benchmarks/sd_levers.py times it):
    # the test compiles through dynamo and AOT autograd with the eager backend, the same in-place path
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_module(self, backend="aot_eager"))
    common = dict(max_train_steps=2, preview=False, lora_dropout=0.0, mixed_precision="no")
    plain = run_training(load_config(sd_config(**common)))
    events = Events()
    compiled = run_training(load_config(sd_config(**common, compile=True, output_dir=tmp_path / "c" / "c")), events)
    warmup = events.first("compiled")["warmup_s"]
    assert warmup > 0 and any(line.startswith("compile: the first step") for line in events.lines)
    assert compiled.losses == pytest.approx(plain.losses, rel=1e-3)
    from safetensors.torch import load_file

    a, b = load_file(str(plain.output_path)), load_file(str(compiled.output_path))
    assert set(a) == set(b)  # in-place compile: the adapter's names are the same


def test_explicit_fp16_on_the_cpu_is_kept_and_the_log_says_what_fits_instead(sd_config):
    import contextlib

    import torch

    from shared.training.speed import resolve_auto
    from shared.training.task import Precision

    def precision(mixed):
        return Precision(torch.device("cpu"), torch.float16 if mixed == "fp16" else torch.float32, mixed,
                         contextlib.nullcontext)

    cfg = load_config(sd_config(mixed_precision="fp16"))
    resolved, notes = resolve_auto(cfg, "sd", precision("fp16"))
    assert resolved.mixed_precision == "fp16"  # the user's explicit choice stands
    assert any(n.startswith("mixed_precision fp16 on cpu") and "mixed_precision: auto" in n for n in notes)
    _, notes = resolve_auto(load_config(sd_config(mixed_precision="no")), "sd", precision("no"))
    assert not any(n.startswith("mixed_precision") for n in notes)


def _precision(device: str, mixed: str):
    import contextlib

    import torch

    from shared.training.task import Precision

    return Precision(torch.device(device), torch.bfloat16 if mixed == "bf16" else torch.float32, mixed,
                     contextlib.nullcontext)


@pytest.mark.parametrize("device, mixed, expected", [("cpu", "bf16", "yes"), ("cpu", "no", "no"), ("cuda", "bf16", "no")])
def test_channels_last_auto_is_on_where_it_was_measured_to_pay(sd_config, device, mixed, expected):
    from shared.training.speed import resolve_auto

    resolved, notes = resolve_auto(load_config(sd_config(mixed_precision=mixed)), "sd", _precision(device, mixed))
    assert resolved.channels_last == expected
    assert any(n.startswith(f"channels_last auto: {expected} (") for n in notes)
    kept, _ = resolve_auto(load_config(sd_config(mixed_precision=mixed, channels_last="no")), "sd",
                           _precision(device, mixed))
    assert kept.channels_last == "no"  # an explicit value stands


def test_channels_last_runs_the_unet_on_nhwc_and_trains_the_same_adapter(sd_config, tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    from shared.sd.task import SDTask
    from shared.train import run_training

    layouts = []
    inject = SDTask._inject

    def record(self):  # the base UNet's layout as the adapters are injected
        layouts.append(self.model.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last))
        inject(self)

    monkeypatch.setattr(SDTask, "_inject", record)
    common = dict(max_train_steps=2, preview=False, lora_dropout=0.0, mixed_precision="no", conv_rank=4)
    plain = run_training(load_config(sd_config(**common, channels_last="no")))
    events = Events()
    nhwc = run_training(load_config(sd_config(**common, channels_last="yes", output_dir=tmp_path / "c" / "c")), events)
    assert layouts == [False, True]
    assert any(line.startswith("UNet convolutions on channels-last tensors") for line in events.lines)
    assert nhwc.losses == pytest.approx(plain.losses, rel=1e-4)
    a, b = load_file(str(plain.output_path)), load_file(str(nhwc.output_path))
    assert set(a) == set(b) and any(".conv" in k or "resnets" in k for k in b)  # LoCon convolutions saved too
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-3) for k in a)


def test_the_memory_plan_gives_up_channels_last_first_when_the_budget_is_short(sd_config):
    from shared.sd.task import SDTask
    from shared.training.memory import GiB, enumerate_plans, plan_job

    # batch 1: a smaller micro-batch (2% slower on the CPU) would otherwise be the cheaper slowdown
    cfg = load_config(sd_config(mixed_precision="bf16", channels_last="yes", batch_size=1, preview=False))
    model = SDTask(cfg, Reporter()).memory_model(_precision("cpu", "bf16"))
    values = {k: getattr(cfg, k) for lever in model.levers for k in lever.keys}
    plans = enumerate_plans(model, values, baseline=0.0)
    own = plans[0]
    contiguous = next(p for p in plans if p.labels == ["channels_last: no"])
    assert contiguous.total < own.total and contiguous.parts["channels_last"] == 0 < own.parts["channels_last"]
    budget = (own.total + contiguous.total) / 2
    plan = plan_job(model, values, device="cpu", budget=budget, baseline=0.0)
    assert plan.changes == {"channels_last": "no"}  # 7% slower, before checkpointing's 33%
    assert plan_job(model, values, device="cpu", budget=own.total + GiB, baseline=0.0).changes == {}
