"""Every benchmark in one run: SD and LLM training against the reference loops, their model FLOPs
utilisation, Flux's step time and peak memory with and without fp8 storage, and the daemon's costs.
Writes `benchmarks/results/latest.json` and `latest.md` (or into --out).

    python -m benchmarks.run_all            # full sizes: SD1.5 at 256 px, a 52 M LLaMA (about 20 min)
    python -m benchmarks.run_all --quick    # tiny models, few steps (a smoke test, under 3 min)

Variants run one after another, each in its own process, alternating; both sides use the same
thread count (default 1: on a small shared machine one thread per process is the stable choice).
Nothing is asserted: the targets (issue 18 for SD and the LLM, issue 11 for the daemon) are printed next
to the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks import daemon_bench, flux_memory, llm_compare, sd_compare
from benchmarks.common import REPO, machine
from benchmarks.memory_estimate import memory_column

TARGETS = {
    **{f"sd_{k}": v for k, v in sd_compare.TARGETS.items()},  # issue 18: ours (defaults) against ref / ref_best
    "llm_speed_ratio": 1.8, "llm_speed_ratio_best": 1.3, "llm_rss_ratio_best": 0.8,  # issue 18: vs HF defaults / best
    "daemon_idle_rss_mb": 80, "daemon_start_s": 1.0, "daemon_first_progress_delay_s": 1.0, "daemon_overhead_s": 2.0,
}


def _sections(quick: bool) -> dict:
    if quick:
        return {"sd": dict(size="tiny", steps=3, warmup=1, rounds=1), "llm": dict(size="tiny", warmup=1, rounds=1),
                "flux": dict(sizes=["tiny"], steps=3, variants=["base", "fp8 base"]),
                "daemon": dict(steps=4, subscribers=50, runs=1)}
    return {"sd": dict(size="full", steps=3, warmup=1, rounds=2), "llm": dict(size="full", warmup=1, rounds=2),
            "flux": dict(sizes=["tiny", "small"], steps=5), "daemon": dict(steps=20, subscribers=50, runs=2)}


def run_all(out: Path, workdir: Path, quick: bool = False, threads: int = 1, only: list[str] | None = None) -> dict:
    plan = _sections(quick)
    started = time.time()
    previous = out / "latest.json"
    # --only refreshes some sections of an earlier run of the same kind and keeps the others
    kept = json.loads(previous.read_text()) if only and previous.is_file() else {}
    if kept.get("quick") != quick:
        kept = {}
    if "sd" in kept and "targets_met" not in kept["sd"]:  # written before best-against-best: not comparable
        del kept["sd"]
    load = [os.getloadavg()]
    result = {**{k: kept[k] for k in ("sd", "llm", "flux", "daemon") if k in kept}, "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "quick": quick,
              "threads": threads, "machine": machine(), "targets": TARGETS}
    if not only or "sd" in only:
        result["sd"] = sd_compare.run(workdir / "sd", threads=threads, model_cache=workdir, **plan["sd"])
        load.append(os.getloadavg())
    if not only or "llm" in only:
        result["llm"] = llm_compare.run(workdir / "llm", threads=threads, model_cache=workdir, **plan["llm"])
        load.append(os.getloadavg())
    if not only or "flux" in only:
        result["flux"] = flux_memory.run(workdir / "flux", threads=threads, **plan["flux"])
        load.append(os.getloadavg())
    if not only or "daemon" in only:
        result["daemon"] = daemon_bench.run(workdir / "daemon", **plan["daemon"])
        load.append(os.getloadavg())
    result["load_avg"] = {"samples": load, "mean_1min": sum(x[0] for x in load) / len(load)}
    result["wall_s"] = time.time() - started
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(result, indent=2, default=float))
    (out / "latest.md").write_text(markdown(result))
    return result


def _f(value, fmt="{:.2f}", none="n/a"):
    return none if value is None else fmt.format(value)


def _mark(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "missed")


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"Run {r['started_at']} ({'quick, tiny models' if r['quick'] else 'full sizes'}), {r['threads']} thread(s) "
             f"per process, load average {r['load_avg']['mean_1min']:.1f} on {m['cores']} cores; "
             f"{m['cpu']}; torch {m['torch']}, Python {m['python']}; {r['wall_s'] / 60:.1f} min in all.", ""]
    t = r["targets"]
    if "sd" in r:
        lines += sd_compare.markdown(r["sd"]).splitlines() + [
            f"Matmul peak measured: {r['sd']['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s (fp32).", ""]
    if "llm" in r:
        lines += llm_markdown(r["llm"], t)
    if "flux" in r:
        lines += ["### Flux LoRA on the CPU (through the Flux task: one image, rank 16, bf16 autocast, cached latents "
                  "and text; the base stored in fp32 on this CPU vs fp8)", "", flux_memory.markdown(r["flux"])]
    if "daemon" in r:
        d = r["daemon"]
        fan = d["fanout"]
        rows = [
            ("start to first answered request", f"{d['start_s_median']:.2f} s", f"< {t['daemon_start_s']} s",
             d["start_s_median"] < t["daemon_start_s"]),
            ("idle RSS (torch loaded: " + ("yes" if d["torch_loaded"] else "no") + ")", f"{d['idle_rss_mb_median']:.1f} MiB",
             f"< {t['daemon_idle_rss_mb']} MB", d["idle_rss_mb_median"] < t["daemon_idle_rss_mb"]),
            ("submit to first progress (in-process: launch to first step)",
             f"{d['submit_to_first_progress_s']:.2f} s ({d['in_process_first_progress_s']:.2f} s)", "", None),
            ("first progress later than in-process", f"{d['first_progress_delay_s']:.2f} s",
             f"< {t['daemon_first_progress_delay_s']} s", d["first_progress_delay_s"] < t["daemon_first_progress_delay_s"]),
            ("first progress: daemon emit to client", f"{d['first_progress_emit_to_client_s'] * 1000:.1f} ms", "", None),
            (f"event latency, {fan['subscribers']} subscribers (median / p95 / max)",
             f"{_f(fan['event_latency_median_s'], '{:.3f}')} / {_f(fan['event_latency_p95_s'], '{:.3f}')} / "
             f"{_f(fan['event_latency_max_s'], '{:.3f}')} s ({fan['subscribers_complete']}/{fan['subscribers']} "
             f"saw the end)", "", None),
            (f"job total, {d['job_steps']} steps: daemon vs in-process",
             f"{d['daemon_total_s']:.2f} s vs {d['in_process_total_s']:.2f} s", "", None),
            ("overhead per job", f"{d['overhead_s']:+.2f} s", f"< {t['daemon_overhead_s']} s",
             d["overhead_s"] < t["daemon_overhead_s"]),
        ]
        lines += ["### Daemon (tiny SD1.5 job)", "", "| measure | value | target | |", "|---|---:|---:|---|"]
        lines += [f"| {a} | {b} | {c} | {_mark(ok) if ok is not None else ''} |" for a, b, c, ok in rows]
        lines.append("")
    return "\n".join(lines)


def llm_markdown(llm: dict, t: dict) -> list[str]:
    s = llm["settings"]
    v = llm["variants"]
    lines = [f"### LLM LoRA ({llm['size']}: LLaMA layout, {llm['params'] / 1e6:.1f} M parameters, "
             f"{llm['trainable_params'] / 1e6:.2f} M trainable, batch {s['batch_size']}, max {s['max_len']} tokens, "
             f"one epoch of {s['rows']} rows each, timed after the first step, {v['ref']['runs']} run(s) each)", "",
             "| variant | trained tokens/s | per CPU s | processed tokens/s | steps | s/step (median) | peak RSS MiB | "
             "speed vs HF defaults / HF best (CPU time) | RSS vs HF best | planner's estimate | MFU |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in v.values():
        best = row.get("speed_ratio_vs_ref_best")
        cpu = (f" ({_f(row.get('cpu_speed_ratio_vs_ref'))} / {_f(row.get('cpu_speed_ratio_vs_ref_best'))})"
               if row.get("tokens_per_cpu_s") else "")
        lines.append(f"| {row['label']} | {row['tokens_per_s']:.0f} | {_f(row.get('tokens_per_cpu_s'), '{:.0f}')} | "
                     f"{row['padded_tokens_per_s']:.0f} | {row['steps']} | {_f(row['median_step_s'], '{:.3f}')} | "
                     f"{row['peak_rss_mb']:.0f} | {row['speed_ratio_vs_ref']:.2f} / {_f(best)}{cpu} | "
                     f"{_f(row.get('rss_ratio_vs_ref_best'))} | {memory_column(row)} | {_f(row['mfu'], '{:.0%}')} |")
    ours = v.get("ours")
    if ours and "ref_best" in v:
        lines += ["", f"Targets (ours, defaults): >= {t['llm_speed_ratio']}x HF defaults: "
                  f"{_mark(ours['speed_ratio_vs_ref'] >= t['llm_speed_ratio'])} ({ours['speed_ratio_vs_ref']:.2f}x); "
                  f">= {t['llm_speed_ratio_best']}x HF at its best: "
                  f"{_mark(ours['speed_ratio_vs_ref_best'] >= t['llm_speed_ratio_best'])} "
                  f"({ours['speed_ratio_vs_ref_best']:.2f}x); peak RSS <= {t['llm_rss_ratio_best']}x HF at its best: "
                  f"{_mark(ours['rss_ratio_vs_ref_best'] <= t['llm_rss_ratio_best'])} "
                  f"({ours['rss_ratio_vs_ref_best']:.2f}x)."]
    notes = "; ".join(ours["notes"]) if ours else ""
    lines += [f"Ours, as its log says: {notes}" if notes else "",
              f"FLOPs per processed token {llm['flops_per_padded_token'] / 1e6:.0f} M (forward + backward); MFU against "
              f"the measured fp32 or bf16 matmul peak of the variant's type.", ""]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models and few steps (smoke test)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="where latest.json/.md go")
    parser.add_argument("--workdir", default="/tmp/lora-daemon-bench",
                        help="scratch space; the random-weight models are written here once and reused")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every variant's process")
    parser.add_argument("--only", nargs="*", choices=("sd", "llm", "flux", "daemon"), help="run only these sections")
    args = parser.parse_args(argv)
    result = run_all(Path(args.out), Path(args.workdir), args.quick, args.threads, args.only)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
