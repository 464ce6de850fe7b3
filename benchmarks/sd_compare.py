"""SD1.5 LoRA training, best against best: our trainer (its defaults, and fp32 without caches) against
the textbook diffusers + peft loop (benchmarks/sd_reference.py) as written (fp32, the VAE and text
encoder every step) and at its best (bf16, latents and text-encoder outputs computed once), optionally
kohya's sd-scripts; the full SD1.5 architecture with random weights, one image, batch 1. Each variant
runs in its own process (clean peak memory), in an order that rotates between rounds so that a change
in the machine's load hits all of them.

    python -m benchmarks.sd_compare [--size full|tiny] [--steps N] [--warmup W] [--rounds R]
                                    [--compile] [--kohya PATH [--kohya-python EXE]]
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import compare_main, count_flops, emit, median, run_worker, step_times
from benchmarks.memory_estimate import memory_column, memory_fields

SIZES = {  # resolution in pixels, the config source
    "full": {"resolution": 256, "configs": "sd15"},
    "tiny": {"resolution": 64, "configs": "tiny"},
    "gpu": {"resolution": 512, "configs": "sd15"},  # benchmarks/gpu: CUDA
}
# issue 18, for ours (defaults) at --size full: time per step against both reference loops, peak RSS
TARGETS = {"time_vs_ref": 0.32, "time_vs_ref_best": 0.8, "peak_rss_mb": 4608}
# name: (label, settings). `ref*` run benchmarks/sd_reference.py with these spec keys; `ours*` our trainer with
# these config keys over its defaults (`ours` is the defaults: whatever precision and caches they resolve to).
VARIANTS = {
    "ref": ("textbook diffusers + peft (fp32, VAE + TE every step)", {"mixed_precision": "no"}),
    "ref_best": ("textbook at its best (bf16, latents + TE cached)", {"mixed_precision": "bf16", "cache": True}),
    "ours": ("ours (defaults)", {}),
    "ours_fp32": ("ours (fp32, no caches)",
                  {"mixed_precision": "no", "cache_latents": "no", "cache_text_encoder_outputs": "no"}),
    "ours_compile": ("ours (defaults + compile)", {"compile": True}),
    # on a card `channels_last: auto` is no until this variant has measured it (shared/training/speed.py)
    "ours_channels_last": ("ours (defaults + channels_last: yes)", {"channels_last": "yes"}),
    "kohya": ("kohya sd-scripts (cached latents, bf16)", {}),
}
LABELS = {name: label for name, (label, _) in VARIANTS.items()}


def component_configs(which: str) -> dict:
    if which == "tiny":
        from shared.fixtures.tiny_sd import TINY_SD15

        return TINY_SD15
    from shared.sd.base_model import shipped_config_dir

    folder = Path(shipped_config_dir("sd1"))
    return {c: json.loads((folder / c / "config.json").read_text()) for c in ("unet", "vae", "text_encoder")}


def build_model(folder: Path, which: str, seed: int = 0) -> Path:
    """A diffusers folder with random weights of the given layout (written once, then reused)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from shared.images.clip_tokenizer import clip_tokenizer
    from shared.sd.base_model import shipped_config_dir

    marker = folder / ".complete"
    if marker.is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    configs = component_configs(which)
    torch.manual_seed(seed)
    UNet2DConditionModel.from_config(configs["unet"]).save_pretrained(folder / "unet")
    AutoencoderKL.from_config(configs["vae"]).save_pretrained(folder / "vae")
    te = {k: v for k, v in configs["text_encoder"].items() if not k.startswith("_")}
    CLIPTextModel(CLIPTextConfig(**te)).save_pretrained(folder / "text_encoder")
    clip_tokenizer().save_pretrained(folder / "tokenizer")
    shipped = Path(shipped_config_dir("sd1"))
    (folder / "scheduler").mkdir(exist_ok=True)
    shutil.copy(shipped / "scheduler" / "scheduler_config.json", folder / "scheduler" / "scheduler_config.json")
    shutil.copy(shipped / "model_index.json", folder / "model_index.json")
    marker.write_text("ok")
    return folder


def make_data(folder: Path, resolution: int) -> Path:
    """One square image at the training resolution (no resize, no crop) and its caption."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:resolution, 0:resolution] / resolution
    pixels = np.stack([x, y, 1 - x * y], -1) * 200 + rng.uniform(0, 55, (resolution, resolution, 3))
    Image.fromarray(pixels.astype(np.uint8)).save(folder / "img0.png")
    (folder / "img0.txt").write_text("a photo of a red bench in a park, bright afternoon light")
    return folder


# ---------------------------------------------------------------------------------------------
# Workers (each in its own process)


def worker_ours(spec: dict) -> dict:
    """Our trainer with the variant's settings over its defaults: step times, losses, what it resolved
    (precision, caches), the first step's time (a compile's warm-up) and the planner's estimate."""
    import torch

    from shared.config import config_from_dict
    from shared.images.lora import lora_state
    from shared.reporting import Reporter
    from shared.sd.task import SDTask
    from shared.train import run_training

    torch.set_num_threads(spec["threads"])
    stamps, losses = [], []
    seen: dict = {}

    class Recorder(Reporter):
        def log(self, message):
            pass

        def event(self, kind, **data):
            if kind == "started":
                seen["started"] = time.perf_counter()
            elif kind == "cached":
                seen["caches"] = data
            elif kind == "compiled":  # the trainer's own measure of the compile's warm-up
                seen["compile_warmup_s"] = data.get("warmup_s")
            elif kind == "progress":
                stamps.append(time.perf_counter())
                losses.append(data["loss"])

    original_load, original_caches = SDTask.load, SDTask.build_caches

    def load(self, precision):  # what `auto` resolved to, for the MFU's peak and the table
        seen["mixed_precision"] = precision.mixed_precision
        return original_load(self, precision)

    def build_caches(self):  # the starting LoRA weights, so the reference can start there too
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in lora_state(self.model.unet).items()}, spec["dump_lora_init"])
        return original_caches(self)

    SDTask.load = load
    if spec.get("dump_lora_init"):
        SDTask.build_caches = build_caches
    cfg = config_from_dict(dict(
        base_model=spec["model"], train_data_dir=spec["data"], output_dir=spec["out"], resolution=spec["resolution"],
        batch_size=spec["batch_size"], max_train_steps=spec["steps"], save_steps=0, lora_rank=spec["rank"],
        lora_alpha=spec["alpha"], lora_dropout=0.0, learning_rate=spec["lr"], seed=spec["seed"],
        device=spec.get("device", "cpu"), preview=False, evaluation=False,  # the textbook loop renders nothing
        **VARIANTS[spec["variant"]][1]))
    t0 = time.perf_counter()
    result = run_training(cfg, Recorder())
    return {"step_s": step_times(stamps, spec["warmup"]), "losses": losses, "setup_s": seen["started"] - t0,
            "first_step_s": stamps[0] - seen["started"] if stamps else None, "total_s": time.perf_counter() - t0,
            "compile_warmup_s": seen.get("compile_warmup_s"), "mixed_precision": seen.get("mixed_precision"),
            "caches": seen.get("caches", {}), **memory_fields(result)}


def worker_ref(spec: dict) -> dict:
    """The reference loop with the variant's settings; on request also the FLOPs of its components."""
    import torch

    from benchmarks import sd_reference

    torch.set_num_threads(spec["threads"])
    stamps, losses = [], []

    def on_step(step, loss):
        stamps.append(time.perf_counter())
        losses.append(loss)

    settings = VARIANTS[spec["variant"]][1]
    t0 = time.perf_counter()
    loop = sd_reference.train({**spec, **settings}, on_step)
    out = {"step_s": step_times(stamps, spec["warmup"]), "losses": losses, "total_s": time.perf_counter() - t0,
           "lora_modules": loop["n_lora_modules"], "trainable_params": loop["trainable"],
           "mixed_precision": settings["mixed_precision"],
           "caches": {"latents": bool(settings.get("cache")), "text": bool(settings.get("cache"))}}
    if spec.get("count_flops"):
        vae, te, unet = loop["vae"], loop["text_encoder"], loop["unet"]
        raw = next(iter(loop["loader"]))
        batch = {"pixel_values": raw["pixel_values"].to(vae.device, vae.dtype), "input_ids": raw["input_ids"].to(te.device)}
        with torch.no_grad():
            out["flops_vae_encode"] = count_flops(lambda: vae.encode(batch["pixel_values"]))
            out["flops_text_encoder"] = count_flops(lambda: te(batch["input_ids"]))
        with torch.no_grad():
            latents = vae.encode(batch["pixel_values"]).latent_dist.mode()
            ehs = te(batch["input_ids"])[0]
        t = torch.tensor([500] * latents.shape[0], device=latents.device)

        def unet_step():
            pred = unet(latents, t, ehs).sample
            pred.float().pow(2).mean().backward()

        out["flops_unet_fwd_bwd"] = count_flops(unet_step)
    return out


_TQDM = re.compile(r"steps:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)(?:.*?avr_loss=([0-9.eE+-]+))?")


def worker_kohya(spec: dict) -> dict:
    """kohya's `train_network.py` on the same model folder, image, LoRA and steps, with cached latents and
    bf16, in a child process. Its step times come from the progress bar it redraws after every step
    (read as it is written), its peak RSS from the child's rusage. Never raises: a failure comes back as
    `not_measured`, so the other variants' table still prints."""
    import resource

    work = Path(spec["out"])
    shutil.rmtree(work, ignore_errors=True)
    # sd-scripts reads DreamBooth-style folders ("<repeats>_<name>") and its tokenizer from the Hub
    # unless a local copy sits in --tokenizer_cache_dir under the Hub name
    images = work / "data" / "1_bench"
    images.mkdir(parents=True)
    for item in Path(spec["data"]).iterdir():
        shutil.copy(item, images / item.name)
    tokenizers = work / "tokenizers"
    shutil.copytree(Path(spec["model"]) / "tokenizer", tokenizers / "openai_clip-vit-large-patch14")
    # its transformers 4 reads the slow CLIP tokenizer's files, which a transformers 5 folder lacks
    from shared.images.clip_tokenizer import clip_vocab_and_merges

    vocab, merges = clip_vocab_and_merges()
    (tokenizers / "openai_clip-vit-large-patch14" / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tokenizers / "openai_clip-vit-large-patch14" / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    r = spec["resolution"]
    command = [
        spec.get("kohya_python") or sys.executable, "train_network.py",
        "--pretrained_model_name_or_path", spec["model"], "--train_data_dir", str(work / "data"),
        "--output_dir", str(work / "out"), "--output_name", "bench", "--save_model_as", "safetensors",
        "--tokenizer_cache_dir", str(tokenizers), "--caption_extension", ".txt", "--resolution", f"{r},{r}",
        "--train_batch_size", str(spec["batch_size"]), "--max_train_steps", str(spec["steps"]),
        "--network_module", "networks.lora", "--network_dim", str(spec["rank"]),
        "--network_alpha", str(spec["alpha"]), "--network_train_unet_only", "--learning_rate", str(spec["lr"]),
        "--optimizer_type", "AdamW", "--lr_scheduler", "cosine", "--max_grad_norm", "1.0",
        "--seed", str(spec["seed"]), "--max_data_loader_n_workers", "0", "--cache_latents",
        "--mixed_precision", "bf16", "--sdpa",
    ]
    marks, losses, tail = [], [], b""
    t0 = time.perf_counter()
    try:
        proc = subprocess.Popen(command, cwd=spec["kohya"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
    except OSError as error:
        return {"not_measured": f"could not start {command[0]} in {spec['kohya']}: {error}"}
    with open(work / "kohya.log", "wb") as log:
        pending = b""
        while chunk := os.read(proc.stdout.fileno(), 65536):  # tqdm redraws with "\r": read as it comes
            now = time.perf_counter()
            log.write(chunk)
            tail = (tail + chunk)[-4000:]
            *lines, pending = re.split(rb"[\r\n]", pending + chunk)
            for line in [*lines, pending]:  # tqdm ends a redraw with no newline: the last is read unfinished too
                match = _TQDM.search(line.decode("utf-8", "replace"))
                if match and int(match[1]) > (marks[-1][1] if marks else 0):
                    marks.append((now, int(match[1])))
                    if match[3]:
                        losses.append(float(match[3]))
    code = proc.wait()
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if code != 0 or len(marks) < 2:
        why = f"exit {code}" if code else "no per-step progress lines in its output"
        return {"not_measured": f"{why}; log {work / 'kohya.log'}", "log_tail": tail.decode("utf-8", "replace")}
    durations = []  # a redraw may cover several steps (tqdm's minimum interval): spread its time over them
    for (a, n), (b, m) in zip(marks, marks[1:]):
        durations += [(b - a) / (m - n)] * (m - n)
    first = marks[0][1]  # steps up to the first redraw have no start time
    timed = durations[max(0, spec["warmup"] - first):]
    return {"step_s": timed, "losses": losses, "total_s": time.perf_counter() - t0, "peak_rss_mb": peak,
            "mixed_precision": "bf16", "caches": {"latents": True, "text": False}}


# ---------------------------------------------------------------------------------------------
# The comparison


def run(workdir: Path, size: str = "full", steps: int = 6, warmup: int = 2, rounds: int = 2, threads: int = 1,
        model_cache: Path | None = None, log=print, device: str = "cpu", compile: bool = False,
        kohya: str | None = None, kohya_python: str | None = None) -> dict:
    """Every variant `rounds` times, `warmup + steps` steps each; returns the summary (see `summarise`).
    `compile` adds ours with torch.compile; `kohya`, a sd-scripts checkout, adds its train_network.py."""
    import torch

    from benchmarks.common import matmul_flops

    info = SIZES[size]
    workdir.mkdir(parents=True, exist_ok=True)
    model = (model_cache or workdir) / f"sd15-{size}-random"
    t = time.perf_counter()
    run_worker("sd_compare", "build", {"threads": threads, "model": str(model), "configs": info["configs"]}, workdir)
    log(f"SD: model folder ready in {time.perf_counter() - t:.0f} s ({model})")
    data = make_data(workdir / "sd-data", info["resolution"])
    base = dict(model=str(model), data=str(data), resolution=info["resolution"], batch_size=1, steps=warmup + steps,
                warmup=warmup, rank=8, alpha=16.0, lr=2e-4, seed=42, threads=threads, device=device)
    init = workdir / "sd-lora-init.safetensors"
    # ours_fp32 first: the reference loops start from the LoRA weights it writes
    order = ["ours_fp32", "ref", "ref_best", "ours"] + ["ours_compile"] * compile + ["kohya"] * bool(kohya)
    order += ["ours_channels_last"] * (device != "cpu")  # on the CPU, the defaults already resolve it
    runs: dict[str, list[dict]] = {v: [] for v in order}
    for r in range(rounds):
        k = r % len(order)
        for variant in order[k:] + order[:k]:  # rotate: each variant runs early and late
            spec = {**base, "variant": variant, "out": str(workdir / f"sd-out-{variant}-{r}"), "lora_init": str(init),
                    "dump_lora_init": str(init) if variant == "ours_fp32" and r == 0 else None,
                    "count_flops": variant == "ref" and r == 0, "kohya": kohya, "kohya_python": kohya_python}
            result = run_worker("sd_compare", variant, spec, workdir)
            runs[variant].append(result)
            if "not_measured" in result:
                log(f"SD: {LABELS[variant]} round {r + 1}: not measured ({result['not_measured']})")
                continue
            log(f"SD: {LABELS[variant]} round {r + 1}: median {median(result['step_s']):.3f} s/step, "
                f"peak RSS {result['peak_rss_mb']:.0f} MiB, load {result['load_avg'][1]:.1f}")
    peaks = {"no": matmul_flops(threads, device=device),
             "bf16": matmul_flops(threads, device=device, dtype=torch.bfloat16)}
    if device != "cpu":
        peaks["fp16"] = matmul_flops(threads, device=device, dtype=torch.float16)
    return summarise(runs, base, peaks, size)


def summarise(runs: dict, base: dict, peaks: dict, size: str) -> dict:
    """Per variant: the median step time, its ratios to both reference loops, peak memory, the planner's
    estimate (ours), FLOPs and MFU against the matmul peak of the type it computed in; the loss curves;
    and the issue's targets, met or missed."""
    ref_flops = runs["ref"][0]
    f_vae, f_te = ref_flops.get("flops_vae_encode", 0), ref_flops.get("flops_text_encoder", 0)
    f_unet = ref_flops.get("flops_unet_fwd_bwd", 0)
    rows, not_measured = {}, {}
    for variant, results in sorted(runs.items(), key=lambda item: list(VARIANTS).index(item[0])):
        if any("not_measured" in r for r in results):
            not_measured[variant] = next(r["not_measured"] for r in results if "not_measured" in r)
            continue
        first = results[0]
        caches = first.get("caches", {})
        flops = f_unet + (0 if caches.get("latents") else f_vae) + (0 if caches.get("text") else f_te)
        peak = peaks.get(first.get("mixed_precision") or "no") or peaks["no"]
        times = [t for r in results for t in r["step_s"]]
        s = median(times)
        rows[variant] = {
            "label": LABELS[variant], "median_step_s": s, "images_per_s": base["batch_size"] / s if s else None,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in results), "step_s_all": times, "runs": len(results),
            "mixed_precision": first.get("mixed_precision"), "caches": caches, "first_step_s": first.get("first_step_s"),
            "compile_warmup_s": first.get("compile_warmup_s"),
            "flops_per_step": flops, "mfu": flops / s / peak if s and peak else None,
            "load_avg": [r["load_avg"] for r in results],
            "peak_vram_mb": max((r.get("peak_vram_mb", 0) for r in results), default=0) or None,
            **{k: x for k, x in first.items() if k.startswith("estimate_")},  # the planner's (ours only)
        }
    for row in rows.values():
        for ref, suffix in (("ref", ""), ("ref_best", "_best")):
            if rows.get(ref, {}).get("median_step_s") and row["median_step_s"]:
                row[f"time_ratio_vs_ref{suffix}"] = row["median_step_s"] / rows[ref]["median_step_s"]
                row[f"rss_ratio_vs_ref{suffix}"] = row["peak_rss_mb"] / rows[ref]["peak_rss_mb"]
    losses = {v: runs[v][0].get("losses", []) for v in rows}
    n = min(len(losses["ours_fp32"]), len(losses["ref"]))
    diffs = [abs(a - b) for a, b in zip(losses["ours_fp32"][:n], losses["ref"][:n])]
    ours = rows.get("ours", {})
    met = {"time_vs_ref": _at_most(ours.get("time_ratio_vs_ref"), TARGETS["time_vs_ref"]),
           "time_vs_ref_best": _at_most(ours.get("time_ratio_vs_ref_best"), TARGETS["time_vs_ref_best"]),
           "peak_rss_mb": _at_most(ours.get("peak_rss_mb"), TARGETS["peak_rss_mb"])}
    return {
        "size": size, "settings": {k: v for k, v in base.items() if k not in ("model", "data")},
        "lora_modules_ref": ref_flops.get("lora_modules"), "trainable_params_ref": ref_flops.get("trainable_params"),
        "matmul_flops_per_s": peaks["no"], "matmul_flops_per_s_by_type": peaks, "variants": rows,
        "not_measured": not_measured, "targets": TARGETS, "targets_met": met,
        "loss_curves": {"ours_fp32": losses["ours_fp32"][:n], "ref": losses["ref"][:n], "steps": n,
                        "max_abs_diff": max(diffs) if diffs else None,
                        "max_rel_diff": max(d / max(abs(b), 1e-12) for d, b in zip(diffs, losses["ref"])) if diffs else None,
                        **{v: losses[v][:n] for v in losses if v not in ("ours_fp32", "ref")}},
    }


def _at_most(value: float | None, limit: float) -> bool | None:
    return None if value is None else value <= limit


def _mark(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "missed")


def _f(value, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def markdown(sd: dict) -> str:
    """The comparison as a Markdown table, the loss-curve check and the issue's targets beside the numbers."""
    s, v = sd["settings"], sd["variants"]
    lines = [f"### SD1.5 LoRA, best against best ({sd['size']}: {s['resolution']} px, batch {s['batch_size']}, "
             f"rank {s['rank']}, {s['steps'] - s['warmup']} timed steps after {s['warmup']} warm-up, "
             f"{v['ref']['runs']} run(s) each)", "",
             "| variant | precision, cached | s/step (median) | vs ref | vs ref_best | peak RSS MiB | "
             "planner's estimate | GFLOP/step | MFU |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in v.values():
        cached = "+".join(k for k in ("latents", "text") if row["caches"].get(k)) or "nothing"
        lines.append(f"| {row['label']} | {row['mixed_precision'] or '?'}, {cached} | "
                     f"{_f(row['median_step_s'], '{:.3f}')} | {_f(row.get('time_ratio_vs_ref'))} | "
                     f"{_f(row.get('time_ratio_vs_ref_best'))} | {row['peak_rss_mb']:.0f} | {memory_column(row)} | "
                     f"{row['flops_per_step'] / 1e9:.1f} | {_f(row['mfu'], '{:.0%}')} |")
    lines.append("")
    for name, why in sd["not_measured"].items():
        lines.append(f"{LABELS[name]}: not measured ({why}).")
    if "kohya" not in v and "kohya" not in sd["not_measured"]:
        lines.append(f"{LABELS['kohya']}: not measured (pass --kohya PATH, a sd-scripts checkout).")
    if "ours_compile" in v:
        c = v["ours_compile"]
        lines.append(f"Compile warm-up: the first step of {LABELS['ours_compile']} took {_f(c['first_step_s'], '{:.1f}')} s "
                     f"(the trainer reports {_f(c['compile_warmup_s'], '{:.1f}')} s; ours (defaults): "
                     f"{_f(v.get('ours', {}).get('first_step_s'), '{:.1f}')} s); the timed steps exclude it.")
    lc = sd["loss_curves"]
    lines.append(f"Loss curves, same seed and start, {lc['steps']} steps: max |ours_fp32 - ref| = "
                 f"{_f(lc['max_abs_diff'], '{:.2e}')} (ours_fp32 {', '.join(f'{x:.4f}' for x in lc['ours_fp32'])}; "
                 f"ref {', '.join(f'{x:.4f}' for x in lc['ref'])}).")
    ours, met, t = v.get("ours", {}), sd["targets_met"], sd["targets"]
    scope = "" if sd["size"] == "full" else f" (set for --size full; this run is --size {sd['size']})"
    lines.append(f"Targets (issue 18, ours defaults){scope}: <= {t['time_vs_ref']}x ref: {_mark(met['time_vs_ref'])} "
                 f"({_f(ours.get('time_ratio_vs_ref'))}x); <= {t['time_vs_ref_best']}x ref_best: "
                 f"{_mark(met['time_vs_ref_best'])} ({_f(ours.get('time_ratio_vs_ref_best'))}x); peak RSS <= "
                 f"{t['peak_rss_mb']} MiB: {_mark(met['peak_rss_mb'])} ({_f(ours.get('peak_rss_mb'), '{:.0f}')} MiB).")
    return "\n".join(lines) + "\n"


def worker_main(name: str, spec: dict) -> None:
    if name == "build":
        build_model(Path(spec["model"]), spec["configs"])
        emit({})
    elif name.startswith("ref"):
        emit(worker_ref(spec))
    elif name == "kohya":
        emit(worker_kohya(spec))
    else:
        emit(worker_ours(spec))


OPTIONS = {
    "--compile": dict(action="store_true", help="also run ours with compile: true (its warm-up reported apart)"),
    "--kohya": dict(metavar="PATH", help="a kohya sd-scripts checkout: also run its train_network.py"),
    "--kohya-python": dict(metavar="EXE", help="the Python with sd-scripts' requirements (default: this one)"),
}


def main(argv=None) -> int:
    return compare_main(argv, doc=__doc__, sizes=SIZES, default_steps=6, section="sd", run=run,
                        worker_main=worker_main, options=OPTIONS, table=markdown)


if __name__ == "__main__":
    sys.exit(main())
