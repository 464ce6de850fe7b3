"""LLM LoRA training: our trainer against the Hugging Face Trainer + PEFT (benchmarks/llm_reference.py),
with its defaults and at its best (bf16, group_by_length), on a LLaMA-layout model with random weights
(about 50 M parameters), alpaca rows of varied length, LoRA rank 8 on every linear layer but the head,
batch 4, LoRA dropout 0.1 on both sides. Every variant trains one whole epoch of the same rows, so all
of them train the same tokens whatever their batches look like (packed, grouped or shuffled); the rate
is trained tokens (label != -100) per second over the steps after the first. Each variant runs in its
own process, in an order that rotates between rounds.

    python -m benchmarks.llm_compare [--size full|tiny] [--rounds R] [--variants ref,ours,...]
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

from benchmarks.common import compare_main, count_flops, emit, median, run_worker, step_times
from benchmarks.memory_estimate import memory_fields

SIZES = {
    "full": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=16, num_attention_heads=8,
                 num_key_value_heads=8, max_len=256),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, max_len=128),
    # benchmarks/gpu: TinyLlama-1.1B's layout (with the small fixture vocabulary: about 1.0 B parameters)
    "gpu": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, max_len=512),
}
# name: (label, settings). `ref*` run benchmarks/llm_reference.py; `ours*` our trainer with these config keys
# on top of the defaults (`ours` is the defaults: whatever `mixed_precision` and `packing` resolve to).
VARIANTS = {
    "ref": ("HF Trainer + PEFT (defaults: fp32, random batches)", {}),
    "ref_best": ("HF Trainer + PEFT at its best (bf16, group_by_length)", {"bf16": True, "group_by_length": True}),
    "ours": ("ours (defaults)", {}),
    "ours_bf16": ("ours (mixed_precision: bf16)", {"mixed_precision": "bf16"}),
    "ours_sdpa": ("ours (attention: sdpa)", {"attention": "sdpa"}),
    "ours_packed": ("ours (bf16, packing: true)", {"mixed_precision": "bf16", "packing": True}),
}
LABELS = {name: label for name, (label, _) in VARIANTS.items()}
WORDS = ("the model answers every question about gardens rivers and mountains with care while the small "
         "robot paints a blue house near the old bridge because light changes quickly in autumn and "
         "people write short notes about trains music bread and weather").split()


def build_model(folder: Path, size: str, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from shared.fixtures.tiny_llm import build_tokenizer

    if (folder / ".complete").is_file():
        return folder
    tokenizer = build_tokenizer()
    layout = {k: v for k, v in SIZES[size].items() if k != "max_len"}
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=1024, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **layout)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    (folder / ".complete").write_text("ok")
    return folder


def make_data(path: Path, rows: int = 96, seed: int = 0) -> Path:
    """Alpaca rows whose answers run from a few words to a few hundred tokens."""
    rng = random.Random(seed)
    data = []
    for i in range(rows):
        n_q, n_a = rng.randint(4, 20), int(rng.choice([3, 8, 15, 30, 60, 90]) * rng.uniform(0.6, 1.4))
        data.append({"instruction": f"Question {i}: " + " ".join(rng.choice(WORDS) for _ in range(n_q)) + "?",
                     "input": "", "output": " ".join(rng.choice(WORDS) for _ in range(n_a)) + "."})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return path


def _rate(stamps, cpu_stamps, tokens, padded, warmup):
    """Rates over the steps after `warmup`: per wall second, and per CPU second of the training process
    (with one torch thread that is the work itself, whatever else the machine runs)."""
    durations = step_times(stamps, warmup)
    n = len(durations)
    trained = sum(tokens[warmup:warmup + n])
    seconds = sum(durations)
    cpu_seconds = sum(step_times(cpu_stamps, warmup))
    return {"step_s": durations, "trained_tokens": trained, "padded_tokens": sum(padded[warmup:warmup + n]),
            "epoch_trained_tokens": sum(tokens), "steps": len(stamps), "seconds": seconds,
            "cpu_seconds": cpu_seconds, "tokens_per_s": trained / seconds if seconds else None,
            "tokens_per_cpu_s": trained / cpu_seconds if cpu_seconds else None}


def worker_ours(spec: dict) -> dict:
    import torch

    from shared.config import config_from_dict
    from shared.llm import loss as llm_loss
    from shared.reporting import Reporter
    from shared.train import run_training
    from shared.training.precision import resolve_mixed_precision

    torch.set_num_threads(spec["threads"])
    stamps, cpu_stamps, tokens, padded, steps, lines = [], [], [], [], [0], []
    original = llm_loss.AnswerLoss.__call__

    def counting_loss(self, model, batch):  # the trained tokens of each step, as the trainer counts them
        total, count = original(self, model, batch)
        if len(tokens) < steps[0] + 1:
            tokens.append(0)
            padded.append(0)
        tokens[-1] += int(count)
        padded[-1] += batch["input_ids"].numel()
        return total, count

    llm_loss.AnswerLoss.__call__ = counting_loss

    class Recorder(Reporter):
        def log(self, message):
            lines.append(message)

        def event(self, kind, **data):
            if kind == "progress":
                stamps.append(time.perf_counter())
                cpu_stamps.append(time.process_time())
                steps[0] += 1

    settings = VARIANTS[spec["variant"]][1]
    cfg = config_from_dict(dict(
        base_model=spec["model"], train_data_dir=spec["data"], output_dir=spec["out"], batch_size=spec["batch_size"],
        epochs=1, save_steps=0, lora_rank=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=0.1,
        learning_rate=spec["lr"], seed=spec["seed"], max_seq_len=spec["max_len"], device=spec.get("device", "cpu"),
        sample_max_tokens=1, **settings))
    t0 = time.perf_counter()
    result = run_training(cfg, Recorder())
    notes = [line for line in lines if line.startswith(("packing:", "Loss:", "Packed"))]
    return {**_rate(stamps, cpu_stamps, tokens, padded, spec["warmup"]), "total_s": time.perf_counter() - t0,
            "notes": notes, "mixed_precision": resolve_mixed_precision(cfg.mixed_precision, cfg.device),
            **memory_fields(result)}


def worker_ref(spec: dict) -> dict:
    import torch

    from benchmarks import llm_reference

    torch.set_num_threads(spec["threads"])
    stamps, cpu_stamps, tokens, padded = [], [], [], []

    def on_step(step):
        stamps.append(time.perf_counter())
        cpu_stamps.append(time.process_time())

    def on_batch(batch):
        tokens.append(int((batch["labels"][:, 1:] != -100).sum()))  # the positions the loss averages over
        padded.append(batch["input_ids"].numel())

    settings = VARIANTS[spec["variant"]][1]
    model, dataset, collator, total = llm_reference.train({**spec, **settings}, on_step, on_batch)
    out = {**_rate(stamps, cpu_stamps, tokens, padded, spec["warmup"]), "total_s": total,
           "params": sum(p.numel() for p in model.parameters()),
           "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if spec.get("count_flops"):
        batch = {k: v.to(model.device) for k, v in collator(dataset[: spec["batch_size"]]).items()}
        model.train()

        def fwd_bwd():
            model(**batch).loss.backward()

        out["flops_per_padded_token"] = count_flops(fwd_bwd) / batch["input_ids"].numel()
    return out


def run(workdir: Path, size: str = "full", steps: int | None = None, warmup: int = 1, rounds: int = 2,
        threads: int = 1, model_cache: Path | None = None, log=print, device: str = "cpu", batch_size: int = 4,
        rows: int = 96, variants: list[str] | None = None) -> dict:
    """Each variant trains one epoch of `rows` alpaca rows (`steps` is accepted for the common command
    line and ignored: an epoch is what makes the variants train the same tokens)."""
    from benchmarks.common import matmul_flops

    workdir.mkdir(parents=True, exist_ok=True)
    model = (model_cache or workdir) / f"llama-{size}-random"
    run_worker("llm_compare", "build", {"threads": threads, "model": str(model), "size": size}, workdir)
    data = make_data(workdir / "llm-data" / f"alpaca-{rows}.json", rows)
    base = dict(model=str(model), data=str(data), batch_size=batch_size, device=device, warmup=warmup, rank=8,
                alpha=16.0, lr=2e-4, seed=42, threads=threads, max_len=SIZES[size]["max_len"], rows=rows)
    order = [v for v in VARIANTS if v in (variants or VARIANTS)]
    if "ref" not in order:
        order.insert(0, "ref")
    runs: dict[str, list[dict]] = {v: [] for v in order}
    for r in range(rounds):
        k = r % len(order)
        for variant in order[k:] + order[:k]:  # rotate: each variant runs early and late
            spec = {**base, "variant": variant, "out": str(workdir / f"llm-out-{variant}-{r}"),
                    "count_flops": variant == "ref" and r == 0}
            result = run_worker("llm_compare", variant, spec, workdir)
            runs[variant].append(result)
            log(f"LLM: {LABELS[variant]} round {r + 1}: {result['tokens_per_s']:.0f} trained tokens/s "
                f"({result['tokens_per_cpu_s']:.0f} per CPU second), "
                f"peak RSS {result['peak_rss_mb']:.0f} MiB, {result['steps']} steps, load {result['load_avg'][1]:.1f}")
    import torch

    peak = matmul_flops(threads, device=device)
    peak_bf16 = matmul_flops(threads, device=device, dtype=torch.bfloat16)
    fpt = runs["ref"][0].get("flops_per_padded_token", 0)
    rows_out = {}
    for variant, results in runs.items():
        trained = sum(r["trained_tokens"] for r in results)
        pad = sum(r["padded_tokens"] for r in results)
        seconds = sum(r["seconds"] for r in results)
        cpu_seconds = sum(r["cpu_seconds"] for r in results)
        bf16 = VARIANTS[variant][1].get("bf16") or results[0].get("mixed_precision") == "bf16"
        rows_out[variant] = {
            "label": LABELS[variant], "tokens_per_s": trained / seconds, "trained_tokens": trained,
            "tokens_per_cpu_s": trained / cpu_seconds if cpu_seconds else None,
            "padded_tokens_per_s": pad / seconds, "padded_tokens": pad,
            "epoch_trained_tokens": results[0]["epoch_trained_tokens"], "steps": results[0]["steps"],
            "median_step_s": median([t for r in results for t in r["step_s"]]),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in results), "runs": len(results),
            "tokens_per_s_runs": [r["tokens_per_s"] for r in results],
            "mfu": fpt * pad / seconds / (peak_bf16 if bf16 else peak) if peak else None,
            "load_avg": [r["load_avg"] for r in results], "notes": results[0].get("notes", []),
            "peak_vram_mb": max((r.get("peak_vram_mb", 0) for r in results), default=0) or None,
            **{k: x for k, x in results[0].items() if k.startswith("estimate_")},  # the planner's (ours only)
        }
    for row in rows_out.values():
        for ref in ("ref", "ref_best"):
            if ref in rows_out:
                suffix = "" if ref == "ref" else "_best"
                row[f"speed_ratio_vs_ref{suffix}"] = row["tokens_per_s"] / rows_out[ref]["tokens_per_s"]
                if row["tokens_per_cpu_s"] and rows_out[ref]["tokens_per_cpu_s"]:
                    row[f"cpu_speed_ratio_vs_ref{suffix}"] = row["tokens_per_cpu_s"] / rows_out[ref]["tokens_per_cpu_s"]
                row[f"rss_ratio_vs_ref{suffix}"] = row["peak_rss_mb"] / rows_out[ref]["peak_rss_mb"]
        row["padded_speed_ratio_vs_ref"] = row["padded_tokens_per_s"] / rows_out["ref"]["padded_tokens_per_s"]
    return {"size": size, "settings": {k: v for k, v in base.items() if k not in ("model", "data")},
            "params": runs["ref"][0]["params"], "trainable_params": runs["ref"][0]["trainable_params"],
            "flops_per_padded_token": fpt, "matmul_flops_per_s": peak, "matmul_bf16_flops_per_s": peak_bf16,
            "variants": rows_out}


def worker_main(name: str, spec: dict) -> None:
    if name == "build":
        build_model(Path(spec["model"]), spec["size"])
        emit({})
    elif name.startswith("ref"):
        emit(worker_ref(spec))
    else:
        emit(worker_ours(spec))


def main(argv=None) -> int:
    from benchmarks import run_all  # its table; imported here because run_all imports this module

    options = {"--variants": dict(type=lambda text: text.split(","),
                                  help=f"comma-separated, from {', '.join(VARIANTS)} (ref always runs)"),
               "--rows": dict(type=int, default=96, help="alpaca rows: one epoch of them per variant")}
    return compare_main(argv, doc=__doc__, sizes=SIZES, default_steps=0, section="llm", run=run,
                        worker_main=worker_main, options=options,
                        table=lambda result: "\n".join(run_all.llm_markdown(result, run_all.TARGETS)))


if __name__ == "__main__":
    sys.exit(main())
