"""Where an LLM adapter goes besides its PEFT folder: llama.cpp, Ollama and text-generation-webui.

The llama.cpp/Ollama files are written into the adapter folder itself, so they appear with it (and
travel with every copy of it); text-generation-webui gets a copy of the PEFT folder in its loras
folder under the never-replace rule of a Lora folder. vLLM needs nothing here: it loads the PEFT
folder as it is (the trainer logs whether it would).
"""

from pathlib import Path

from .setting import LLM_ONLY, Rule, Setting

SECTION = "LLM deploy"
GGUF_KEYS = ("gguf_adapter", "gguf_base", "ollama_base")

SETTINGS = (
    Setting("gguf_adapter", bool, False, "Also write <name>-lora.gguf into the adapter folder: the adapter as a "
            "llama.cpp LoRA adapter (`llama-cli --lora`, Ollama's ADAPTER). LLaMA, Mistral and Qwen2 bases.",
            tasks=LLM_ONLY),
    Setting("gguf_base", bool, False, "Also write the base model as <base>-f16.gguf into the adapter folder (as "
            "large as the model in f16), and a Modelfile using it; with merge_output, the merged model as "
            "<name>-merged-f16.gguf too. Implies gguf_adapter.", tasks=LLM_ONLY),
    # FROM is the rest of a Modelfile line: no whitespace, so a value can never add a line of its own
    Setting("ollama_base", str, None, "The base as Ollama knows it (e.g. llama3.2:1b) or a GGUF file of it: writes "
            "a Modelfile (FROM this, ADAPTER the GGUF adapter, TEMPLATE and stops from the chat template trained "
            "with) into the adapter folder. Implies gguf_adapter.", tasks=LLM_ONLY, optional=True,
            pattern=r"[^\s\"]{1,500}", pattern_help="an Ollama model name or a GGUF path, without spaces or quotes"),
    Setting("textgen_dir", Path, None, "A text-generation-webui folder (or its loras folder): the PEFT adapter is "
            "copied into its user_data/loras (or loras) under a name that never overwrites.", tasks=LLM_ONLY,
            optional=True, path="write", exists="dir"),
)


def wants_gguf(v) -> bool:
    """Whether a job writes the llama.cpp adapter (every GGUF/Ollama key implies it)."""
    return any(v[key] for key in GGUF_KEYS)


def _no_dora_in_gguf(v) -> str | None:
    if v["use_dora"] and wants_gguf(v):
        given = ", ".join(k for k in GGUF_KEYS if v[k])
        return (f"use_dora: llama.cpp LoRA adapters have no DoRA magnitude vectors, so a DoRA adapter cannot be "
                f"exported to GGUF ({given}); set use_dora: false, or drop {given}")
    return None


RULES = (Rule(("use_dora", *GGUF_KEYS), _no_dora_in_gguf, tasks=LLM_ONLY),)
