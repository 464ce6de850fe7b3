"""What an LLM job leaves: the PEFT adapter folder with its tokenizer (and training_info.json), and
optionally the base model with the adapter merged in."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from shared.files import publish_new_folder
from shared.llm.model import remote_code_files


def save_adapter(model, tokenizer, folder: Path, info: dict | None = None) -> None:
    """adapter_config.json + adapter_model.safetensors, the tokenizer it was trained with (its chat
    template included, so inference renders prompts the same way) and, finished, training_info.json."""
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    if info is not None:
        (folder / "training_info.json").write_text(json.dumps(info, indent=2, default=str))


def run_info(cfg, started_at: str, steps: int, data, losses, eval_losses) -> dict:
    """training_info.json beside the adapter: what was trained, from what, and how it went."""
    return {
        "trainer": "lora-daemon",
        "base_model": str(cfg.base_model),
        "started_at": started_at,
        "steps": steps,
        "train_sequences": len(data.train),
        "val_samples": len(data.val),
        "final_loss": losses[-1] if losses else None,
        "eval_loss": eval_losses[-1] if eval_losses else None,
        "config": cfg.to_dict(),
    }


def export_merged(adapter: Path, tokenizer, base: Path, output_dir: Path, stem: str,
                  trust_remote_code: bool = False) -> Path:
    """The base model with the published `adapter` merged in, as a plain Transformers folder
    (safetensors). The base is read again from its own files, in their own number type: the training
    copy may be stored in bf16 (mixed precision), which would round every merged weight."""
    from peft import PeftModel

    from shared.llm.model import load_causal_lm

    merged = PeftModel.from_pretrained(load_causal_lm(base, trust_remote_code=trust_remote_code),
                                       str(adapter)).merge_and_unload()

    def write(folder: Path) -> None:
        merged.save_pretrained(str(folder), safe_serialization=True)
        tokenizer.save_pretrained(str(folder))
        for code in remote_code_files(base):  # a remote-code model needs its code beside the weights
            if not (folder / code.name).exists():
                shutil.copy2(code, folder / code.name)

    return publish_new_folder(output_dir, stem, write)
