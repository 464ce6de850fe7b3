"""Language-model jobs: sequence length, templates, packing, evaluation and what is written."""

from .setting import LLM_ONLY, Rule, Setting

SECTION = "Language models"
SETTINGS = (
    Setting("max_seq_len", int, 1024, "Tokens per sample; longer samples are cut (and counted in the log).",
            tasks=LLM_ONLY, minimum=8, maximum=1_048_576),
    Setting("train_on_prompt", bool, False, "Also train on prompt tokens (default: loss on the answers only).",
            tasks=LLM_ONLY),
    Setting("chat_template", str, None, "Template for chat/alpaca rows: the tokenizer's own by default; `chatml` or "
            "`alpaca` for a tokenizer without one (or to override it).", tasks=LLM_ONLY, optional=True),
    Setting("packing", str, "auto", "Join whole samples into sequences of up to max_seq_len tokens, each sample "
            "attending only to itself; `auto`: on when the median sample is at most a quarter of max_seq_len (the log "
            "says which and why). Off: batches of samples of similar length.", tasks=LLM_ONLY,
            choices=("auto", True, False)),
    Setting("attention", str, "auto", "How the model computes attention. sdpa: torch's fused kernels "
            "(flash-attention 2 on CUDA when installed). eager: transformers' matmul + softmax, which keeps the "
            "attention weights for the backward pass and trains short rows faster on a CPU under bf16. auto: on a "
            "CPU under bf16, eager for batches of up to 192 tokens a row and sdpa for longer ones; sdpa elsewhere. The "
            "memory plan falls back to sdpa when eager's weights do not fit.",
            tasks=LLM_ONLY, choices=("auto", "sdpa", "eager")),
    Setting("val_split", float, 0.0, "Fraction of samples held out for eval loss and perplexity (0.1 = 10%; "
            "0: none).", tasks=LLM_ONLY, minimum=0, maximum=1, exclusive_maximum=True),
    Setting("trust_remote_code", bool, False, "Allow a model folder's own Python code (auto_map) to run. Only for "
            "folders you trust.", tasks=LLM_ONLY),
    Setting("load_in_4bit", bool, False, "QLoRA: load the base model in 4-bit NF4 (needs CUDA and bitsandbytes).",
            tasks=LLM_ONLY),
    Setting("merge_output", bool, False, "Also write the base model with the LoRA merged in, as "
            "<output_name>-merged.", tasks=LLM_ONLY),
)


def _no_merge_into_4bit(v) -> str | None:
    if v["load_in_4bit"] and v["merge_output"]:
        return ("merge_output cannot merge into a 4-bit model; train with load_in_4bit and merge the adapter into "
                "the full-precision model separately, or set merge_output: false")
    return None


RULES = (Rule(("merge_output", "load_in_4bit"), _no_merge_into_4bit, tasks=LLM_ONLY),)
