"""Where an LLM adapter goes after training: the files llama.cpp and Ollama load, the PEFT folder in
text-generation-webui's loras folder, and a check that vLLM can load it.

- llama.cpp / Ollama: `write_llama_cpp_files` writes, into a folder being published (the adapter's
  own, so everything appears at once): `<stem>-lora.gguf` (the GGUF LoRA adapter), optionally
  `<base>-f16.gguf` (the base model as GGUF, for users without it), and `Modelfile` (FROM the base the
  user names, or that GGUF; ADAPTER the adapter; TEMPLATE and stops from the training template).
- text-generation-webui: its LoRA menu lists the folders of `user_data/loras/` (newer releases) or
  `loras/` and loads one with PEFT, so the PEFT folder is placed there under the never-replace rule
  of the Lora folder (`publish_new_folder`: a new name if taken, never half a folder).
- vLLM: `--lora-modules name=<folder>` loads the PEFT folder as it is; `vllm_problems` checks the
  fields vLLM's PEFTHelper reads and refuses (see VLLM_FIELDS).

`Targets` is what one LLM job's deploy keys (shared/schema/llm_deploy.py) ask for, as the LLM task
uses it: checked when the job loads (before the weights), written into each adapter folder being
published, placed and checked after publishing. `preflight_targets` is the part the pre-flight can
check from the config's values alone.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from shared.errors import ConfigError, ModelError
from shared.schema.llm_deploy import wants_gguf

# What vLLM's LoRA loader (vllm/lora/peft_helper.py, PEFTHelper.from_dict / validate_legal) reads
# from adapter_config.json: r, lora_alpha and target_modules are required; bias must be "none";
# modules_to_save must be empty; use_dora is refused; use_rslora changes the scale to
# alpha/sqrt(r); the largest rank (r and rank_pattern) must not exceed --max-lora-rank (16 by default).
VLLM_REQUIRED = ("r", "lora_alpha", "target_modules")
VLLM_FIELDS = (*VLLM_REQUIRED, "bias", "modules_to_save", "use_rslora", "use_dora", "rank_pattern")
VLLM_DEFAULT_MAX_RANK = 16

# Files of the adapter folder that are for other hosts, not PEFT: left out of the loras copy.
NOT_FOR_PEFT = ("*.gguf", "Modelfile")


# ---------------------------------------------------------------------------------------------
# llama.cpp and Ollama


def check_ollama_settings(ollama_from: str | None, base_gguf: bool, chat_template: str | None) -> None:
    """Pre-flight of the Modelfile: it needs a FROM and the chat template the job trains with."""
    if not ollama_from and not base_gguf:
        raise ConfigError(
            "ollama_base: the Modelfile needs a FROM: name the base as Ollama knows it (e.g. llama3.2:1b) or "
            "a GGUF file of it, or set gguf_base: true to export the base model as GGUF"
        )
    if chat_template is None:
        raise ConfigError(
            "chat_template: the Modelfile's TEMPLATE is derived from the chat template the job trains with, and "
            "there is none; set chat_template: chatml (or alpaca), or train on chat/alpaca rows"
        )


def write_llama_cpp_files(
    folder: Path,
    *,
    adapter_dir: Path,
    base_model: Path,
    stem: str,
    tokenizer,
    chat_template: str | None,
    ollama_from: str | None = None,
    base_gguf: bool = False,
) -> dict[str, Path]:
    """Write the GGUF adapter, optionally the base as GGUF f16, and the Modelfile into `folder`
    (llama.cpp alone needs only `write_adapter_gguf`). `ollama_from` is the Modelfile's FROM (an Ollama model name or a path);
    with `base_gguf` and no `ollama_from`, FROM is the exported base GGUF. Returns {kind: path}."""
    from shared.llm.gguf_export import write_adapter_gguf, write_model_gguf
    from shared.llm.modelfile import write_modelfile

    folder = Path(folder)
    check_ollama_settings(ollama_from, base_gguf, chat_template)
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    adapter_gguf = folder / f"{stem}-lora.gguf"
    write_adapter_gguf(adapter_dir, base_model, adapter_gguf, name=stem)
    out["gguf_adapter"] = adapter_gguf
    if base_gguf:
        out["gguf_base"] = write_model_gguf(
            base_model, folder / f"{Path(base_model).name}-f16.gguf", chat_template=chat_template
        )
    source = ollama_from or f"./{out['gguf_base'].name}"
    out["modelfile"] = write_modelfile(
        folder, base=source, adapter=f"./{adapter_gguf.name}", tokenizer=tokenizer, chat_template=chat_template,
        name=stem,
    )
    return out


# ---------------------------------------------------------------------------------------------
# text-generation-webui


def textgen_candidates(path: Path) -> tuple[Path, Path]:
    """Where a text-generation-webui install keeps its LoRAs: `user_data/loras` (newer releases) or
    `loras` (older)."""
    return Path(path) / "user_data" / "loras", Path(path) / "loras"


def textgen_loras_dir(path: Path) -> Path:
    """The loras folder of a text-generation-webui install (`textgen_candidates`), or `path` itself
    when it is a loras folder."""
    path = Path(path)
    for candidate in textgen_candidates(path):
        if candidate.is_dir():
            return candidate
    if path.name == "loras" and path.is_dir():
        return path
    raise ConfigError(
        f"textgen_dir: {path} is neither a text-generation-webui folder (with user_data/loras or loras) "
        "nor a loras folder"
    )


def place_in_textgen(adapter_dir: Path, textgen_dir: Path, name: str) -> Path:
    """Copy the PEFT folder into text-generation-webui's loras folder as `name` (or `name_2`, ...):
    a new folder that appears whole, never over an existing one."""
    from shared.files import publish_new_folder

    adapter_dir = Path(adapter_dir)
    skip = shutil.ignore_patterns(*NOT_FOR_PEFT)

    def write(tmp: Path) -> None:
        shutil.copytree(adapter_dir, tmp, dirs_exist_ok=True, ignore=skip)

    return publish_new_folder(textgen_loras_dir(textgen_dir), name, write)


# ---------------------------------------------------------------------------------------------
# vLLM


def vllm_problems(adapter_dir: Path, max_lora_rank: int = VLLM_DEFAULT_MAX_RANK) -> list[str]:
    """Why vLLM would refuse this PEFT folder (empty when it loads): the adapter_config.json fields
    its PEFTHelper reads, and weight names it can parse (`base_model.model.<module>.lora_A/B.weight`)."""
    from safetensors import safe_open

    adapter_dir = Path(adapter_dir)
    problems = []
    try:
        cfg = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return [f"adapter_config.json: unreadable ({exc})"]
    missing = [k for k in VLLM_REQUIRED if k not in cfg]
    if missing:
        problems.append(f"adapter_config.json lacks {', '.join(missing)}")
    if (cfg.get("bias") or "none") != "none":
        problems.append(f"bias={cfg['bias']!r}: vLLM loads no adapter biases")
    if cfg.get("modules_to_save"):
        problems.append("modules_to_save: vLLM supports none")
    if cfg.get("use_dora"):
        problems.append("use_dora: vLLM does not support DoRA")
    ranks = [int(cfg.get("r", 0)), *map(int, (cfg.get("rank_pattern") or {}).values())]
    if max(ranks) > max_lora_rank:
        problems.append(f"rank {max(ranks)} is above vLLM's --max-lora-rank {max_lora_rank}; start vLLM with a larger one")
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        problems.append("no adapter_model.safetensors")
    else:
        with safe_open(str(weights), framework="pt") as f:
            odd = [k for k in f.keys() if not (k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight")))]
        if odd:
            problems.append(f"weights vLLM cannot map: {', '.join(odd[:3])}")
    return problems


def check_vllm(adapter_dir: Path, max_lora_rank: int = VLLM_DEFAULT_MAX_RANK) -> None:
    problems = vllm_problems(adapter_dir, max_lora_rank)
    if problems:
        raise ModelError(f"vLLM: {adapter_dir} would not load: {'; '.join(problems)}")


# ---------------------------------------------------------------------------------------------
# One job's deploy keys


def preflight_targets(values) -> Path | None:
    """What the pre-flight checks of the deploy keys from the config's values (`values[key]`; no
    weights, no tokenizer library): the adapter (and with gguf_base the base: its weights' format,
    rope scaling, tokenizer) exports to GGUF, `textgen_dir` is a text-generation-webui folder.
    Returns the loras folder a copy will go to, or None. (The daemon confines `textgen_candidates`
    to its write roots first: a loras folder may be a link out of `textgen_dir`.)"""
    from shared.llm.gguf_export import check_gguf_exportable, check_model_exportable

    if wants_gguf(values):
        check_gguf_exportable(Path(values["base_model"]), use_dora=values["use_dora"])
    if values["gguf_base"]:  # the base (and a merged model, which has its config and tokenizer) as GGUF
        check_model_exportable(Path(values["base_model"]), "base_model")
    return textgen_loras_dir(Path(values["textgen_dir"])) if values["textgen_dir"] else None


class Targets:
    """The deploy keys of one LLM job (shared/schema/llm_deploy.py), as the LLM task uses them.

    Built when the job loads, after the data and before the weights: everything that could refuse the
    files is checked then (a job never trains for an hour to fail at its Modelfile). `write` puts the
    llama.cpp/Ollama files into an adapter folder being published (the PEFT files are already in it),
    so they appear with it; `after_publish` places the text-generation-webui copy, writes the merged
    GGUF and logs whether vLLM would load the adapter."""

    def __init__(self, cfg, tokenizer, template: str | None, reporter):
        from shared.llm.modelfile import template_pieces

        self.cfg, self.tokenizer, self.reporter = cfg, tokenizer, reporter
        self.base = Path(cfg.base_model)
        self.gguf = wants_gguf(vars(cfg))
        self.modelfile = bool(cfg.ollama_base or cfg.gguf_base)
        self.template = template
        preflight_targets(vars(cfg))  # again, for a config that did not come through the pre-flight
        if self.modelfile:
            if template is None:
                key = "ollama_base" if cfg.ollama_base else "gguf_base"
                raise ConfigError(
                    f"{key}: the Modelfile's TEMPLATE comes from the chat template the job trains with, and this "
                    "job's rows (prompt/completion or text) train without one; train on chat or alpaca rows, or "
                    "use gguf_adapter alone (llama.cpp takes the prompt as it is)"
                )
            check_ollama_settings(cfg.ollama_base, cfg.gguf_base, template)
            template_pieces(tokenizer, template)  # refuses a template no Ollama TEMPLATE can reproduce
        self.names: dict[str, str] = {}  # kind -> file name in the adapter folder, once written

    def write(self, folder: Path, stem: str) -> None:
        """The GGUF adapter (and base GGUF, Modelfile) into `folder`, a finished adapter being published."""
        from shared.llm.gguf_export import write_adapter_gguf

        if not self.gguf:
            return
        folder = Path(folder)
        if self.modelfile:
            out = write_llama_cpp_files(folder, adapter_dir=folder, base_model=self.base, stem=stem,
                                        tokenizer=self.tokenizer, chat_template=self.template,
                                        ollama_from=self.cfg.ollama_base, base_gguf=self.cfg.gguf_base)
        else:
            out = {"gguf_adapter": write_adapter_gguf(folder, self.base, folder / f"{stem}-lora.gguf", name=stem).path}
        self.names = {kind: path.name for kind, path in out.items()}

    def after_publish(self, published: Path, output_dir: Path, merged: Path | None = None) -> dict[str, Path]:
        """Outputs beside the published adapter: its llama.cpp/Ollama files, the merged model as GGUF
        (with merge_output and gguf_base), the text-generation-webui copy; and the vLLM check, logged."""
        from shared.llm.gguf_export import export_model_gguf

        published = Path(published)
        outputs = {kind: published / name for kind, name in self.names.items()}
        log = self.reporter.log
        if "gguf_adapter" in outputs:
            base_gguf = outputs.get("gguf_base")
            log(f"llama.cpp: llama-cli -m {base_gguf or '<the base model as GGUF>'} --lora {outputs['gguf_adapter']}")
        if "modelfile" in outputs:
            log(f"Ollama: cd {published} && ollama create {published.name} -f Modelfile")
        if merged is not None and self.cfg.gguf_base:
            outputs["merged_gguf"] = export_model_gguf(merged, output_dir, merged.name, chat_template=self.template)
            log(f"Saved the merged model as GGUF: {outputs['merged_gguf']}")
        if self.cfg.textgen_dir:
            outputs["textgen"] = place_in_textgen(published, Path(self.cfg.textgen_dir), published.name)
            log(f"text-generation-webui: copied the adapter to {outputs['textgen']} (Model tab, LoRA(s))")
        problems = vllm_problems(published)
        if problems:
            log(f"Note: vLLM would not load this adapter: {'; '.join(problems)}")
        else:
            log(f"vLLM: vllm serve {self.base} --enable-lora --lora-modules {published.name}={published}")
        return outputs
