"""The evaluation's share of a job's time (issue 22: under 10% with the defaults): the same job is run with
the evaluation's defaults (every saved checkpoint and the end) and the seconds spent inside the
evaluation (its renders or answers, its scores, its grids) are set against the whole job's. Prints
numbers; asserts nothing.

    python -m benchmarks.eval_cost                       # tiny SD1.5 and tiny LLaMA, default cadence
    python -m benchmarks.eval_cost --quick               # fewer steps (a smoke run; the share is higher)
    python -m benchmarks.eval_cost --sd-model PATH [--model-config DIR] --data DIR --resolution 512 \
        --steps 1000 --device cuda                        # a full-size SD job: the number the issue asks for

The tiny models train a step in a few milliseconds while a picture still costs `sample_steps` UNet
passes, so the tiny share overstates the full-size one (a full-size step costs about three UNet passes,
forward and backward); the full-size command gives the real number.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout, not an installed copy


def quiet():
    """A reporter that counts the evaluations and drops the log lines."""
    from shared.reporting import Reporter

    class Quiet(Reporter):
        evaluations = 0
        rate = None  # the trainer's own steps per second (its smoothed rate), after the last step

        def log(self, message):
            pass

        def event(self, kind, **data):
            self.evaluations += kind == "evaluation"
            if kind == "progress" and data.get("it_s"):
                self.rate = data["it_s"]

    return Quiet()


def run(values: dict) -> dict:
    from shared.config import config_from_dict
    from shared.train import run_training

    cfg = config_from_dict(values, source="benchmarks/eval_cost.py")
    reporter = quiet()
    started = time.perf_counter()
    result = run_training(cfg, reporter)
    wall = time.perf_counter() - started
    return {"evaluation_s": result.evaluation_seconds, "job_s": result.job_seconds, "wall_s": wall,
            "share": result.evaluation_seconds / result.job_seconds, "evaluations": reporter.evaluations,
            "verdicts": [v["verdict"] for v in result.verdicts], "step_s": 1 / reporter.rate if reporter.rate else None,
            "steps": values["max_train_steps"]}


def at_default_length(row: dict, steps: int = 1000) -> float | None:
    """The share a job of `steps` steps would give with the same evaluations (save_steps = steps / 2: one at the
    middle checkpoint and one at the end, as in the measured run): the measured job's time plus the missing
    steps at its measured step time. For a short full-size run, which takes minutes a step on a CPU."""
    if not row["step_s"] or row["steps"] >= steps:
        return None
    longer = row["job_s"] + (steps - row["steps"]) * row["step_s"]
    return row["evaluation_s"] / longer


def show(label: str, steps: int, save_steps: int, row: dict) -> None:
    print(f"{label:28s} {steps:5d} steps, save_steps {save_steps:4d}: {row['evaluations']} evaluations, "
          f"{row['evaluation_s']:7.1f} s of {row['job_s']:7.1f} s = {row['share']:6.1%} "
          f"(verdicts: {', '.join(row['verdicts']) or 'none'})", flush=True)
    extrapolated = at_default_length(row)
    if extrapolated is not None and row["evaluations"] == 2:
        print(f"{'':28s} {row['step_s']:.2f} s a step: at 1000 steps with save_steps 500 (2 evaluations) the "
              f"share would be {extrapolated:.1%}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (smoke run)")
    parser.add_argument("--steps", type=int, help="steps per job (default 1000; --quick 100)")
    parser.add_argument("--save-steps", type=int, default=500, help="the default cadence: save_steps 500")
    parser.add_argument("--sd-model", help="a full-size SD checkpoint (file or diffusers folder) instead of the tiny one")
    parser.add_argument("--model-config", help="its component configs, when the file needs them")
    parser.add_argument("--data", help="a training image folder (default: 8 generated images)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-llm", action="store_true")
    args = parser.parse_args()
    steps = args.steps or (100 if args.quick else 1000)
    save_steps = min(args.save_steps, steps // 2) if args.quick else args.save_steps

    import torch

    from shared.fixtures.images import make_image_folder

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="eval-cost-"))
    data = Path(args.data) if args.data else make_image_folder(root / "images", count=8)
    if args.sd_model:
        model, config = args.sd_model, args.model_config
    else:
        from shared.fixtures.tiny_sd import build_tiny_sd15

        paths = build_tiny_sd15(root / "tiny_sd", formats=("safetensors",))
        model, config = str(paths["safetensors"]), str(paths["config"])
    sd = dict(base_model=model, train_data_dir=str(data), output_dir=str(root / "sd" / "cost"),
              resolution=args.resolution, batch_size=1, max_train_steps=steps, save_steps=save_steps,
              device=args.device, cache_latents="memory")
    if config:
        sd["model_config"] = config
    show("SD (evaluation defaults)", steps, save_steps, run(sd))

    if not args.skip_llm and not args.sd_model:
        from shared.fixtures.tiny_llm import INSTRUCTION_PAIRS, build_tiny_llama, write_instruction_data

        llama = build_tiny_llama(root / "tiny_llama")
        chat = write_instruction_data(root / "chat.jsonl", "chat", INSTRUCTION_PAIRS[:8])
        llm = dict(base_model=str(llama), train_data_dir=str(chat), output_dir=str(root / "llm" / "cost"),
                   max_train_steps=steps, save_steps=save_steps, learning_rate=1e-2, batch_size=4,
                   max_seq_len=64, device="cpu", lora_dropout=0.0)
        show("LLM (evaluation defaults)", steps, save_steps, run(llm))
    print(f"(outputs and report.html under {root})")


if __name__ == "__main__":
    main()
