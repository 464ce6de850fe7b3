"""The reference LLM LoRA run, written the textbook way: `AutoModelForCausalLM` + peft
`get_peft_model`, the alpaca rows rendered with the tokenizer's chat template (prompt tokens masked
with -100), `DataCollatorForSeq2Seq` padding each batch to its longest row, and the Hugging Face
`Trainer` with the same optimiser settings as ours (AdamW, lr, cosine, weight decay, clipping), LoRA
dropout 0.1 (ours' default). With `bf16` and `group_by_length` in the spec it is the Trainer at its best.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def encode_rows(path: Path, tokenizer, max_len: int) -> list[dict]:
    rows = json.loads(Path(path).read_text())
    out = []
    for row in rows:
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
        prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        ids = tokenizer(full, add_special_tokens=False).input_ids
        if tokenizer.eos_token_id not in ids[len(prompt_ids):]:
            ids.append(tokenizer.eos_token_id)
        ids = ids[:max_len]
        labels = [-100] * len(prompt_ids) + ids[len(prompt_ids):]
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels[: len(ids)]})
    return out


def train(spec: dict, on_step=None, on_batch=None):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=0.1,
                                             target_modules=TARGET_MODULES, task_type="CAUSAL_LM"))
    dataset = encode_rows(spec["data"], tokenizer, spec["max_len"])
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")

    def collate(features):
        batch = collator(features)
        if on_batch:
            on_batch(batch)
        return batch

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if on_step:
                on_step(state.global_step)

    # `bf16` and `group_by_length` are the Trainer at its best on this data: autocast to bf16 over the fp32
    # model, and batches of similar length (its LengthGroupedSampler); the defaults are neither.
    args = TrainingArguments(
        output_dir=spec["out"], per_device_train_batch_size=spec["batch_size"],
        num_train_epochs=1, max_steps=spec.get("steps") or -1,
        train_sampling_strategy="group_by_length" if spec.get("group_by_length") else "random",
        learning_rate=spec["lr"], lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.01, max_grad_norm=1.0,
        logging_steps=10_000, save_strategy="no", report_to=[], use_cpu=spec.get("device", "cpu") == "cpu",
        seed=spec["seed"], dataloader_num_workers=0, bf16=bool(spec.get("bf16")), disable_tqdm=True, remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate, callbacks=[StepTimes()])
    t0 = time.perf_counter()
    trainer.train()
    return model, dataset, collator, time.perf_counter() - t0
