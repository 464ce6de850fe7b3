"""Preference tuning of an LLM LoRA: DPO, ORPO or KTO on chosen/rejected pairs instead of SFT."""

from .setting import LLM_ONLY, Rule, Setting

SECTION = "Preference tuning (LLM)"
OBJECTIVES = ("sft", "dpo", "orpo", "kto")

SETTINGS = (
    Setting("objective", str, "sft", "What the LoRA learns from: sft (one answer per row) or a preference method on "
            "rows with `chosen` and `rejected` answers: dpo, orpo (no reference model) or kto.", tasks=LLM_ONLY,
            choices=OBJECTIVES),
    Setting("pref_beta", float, 0.1, "DPO/KTO: how close to the base the adapter stays (higher: closer); ORPO: the "
            "weight of the odds-ratio term (lambda).", tasks=LLM_ONLY, minimum=0, exclusive_minimum=True,
            maximum=10),
    Setting("dpo_label_smoothing", float, 0.0, "DPO: the assumed fraction of pairs whose labels are swapped "
            "(conservative DPO; 0: trust every pair).", tasks=LLM_ONLY, minimum=0, maximum=0.5,
            exclusive_maximum=True),
)


def _smoothing_is_dpo(v) -> str | None:
    if v["dpo_label_smoothing"] and v["objective"] != "dpo":
        return (f"dpo_label_smoothing applies to objective: dpo (this job's objective is {v['objective']}); "
                "set it to 0 or use dpo")
    return None


def _kto_batch(v) -> str | None:
    if v["objective"] != "kto":
        return None
    if v["batch_size"] < 2:
        return ("objective: kto estimates its reference point from the other pairs of a batch; set batch_size to 2 "
                "or more")
    if v["num_processes"] > 1:
        # each process would see only its share of the batch, so the estimate (and the training) would
        # differ from one process's
        return ("objective: kto estimates its reference point from the whole batch and runs in one process; set "
                "num_processes: 1, or use dpo or orpo, which train on several")
    return None


RULES = (
    Rule(("dpo_label_smoothing", "objective"), _smoothing_is_dpo, tasks=LLM_ONLY),
    Rule(("objective", "batch_size", "num_processes"), _kto_batch, tasks=LLM_ONLY),
)
