"""GGUF files for llama.cpp and Ollama, written with the `gguf` package: a PEFT LoRA adapter as a
llama.cpp LoRA adapter, and a Transformers model (the base, or a merged model) as a GGUF model.

What llama.cpp's own converters write, and so what this module writes:

- Adapter (convert_lora_to_gguf.py): `general.architecture` = the base model's llama.cpp
  architecture, `general.type` = "adapter", `adapter.type` = "lora", `adapter.lora.alpha` (float32).
  Per adapted weight two F32 tensors named after the base model's GGUF tensor plus `.lora_a` /
  `.lora_b`: `blk.0.attn_q.weight.lora_a` holds PEFT's lora_A (torch [r, in], GGUF ne [in, r]) and
  `.lora_b` holds lora_B (torch [out, r], GGUF ne [r, out]). llama.cpp scales the update by
  alpha / r, r being the lora_b's ne[0]. No hyper-parameters, no vocabulary.
- Model (convert_hf_to_gguf.py): 2-D `.weight` tensors in F16 (`general.file_type` 1), 1-D tensors
  and norms in F32, hyper-parameters under `<arch>.*`, the tokenizer under `tokenizer.ggml.*`.
- LLaMA-family attention (LLaMA, Mistral): llama.cpp's LLaMA graph rotates interleaved pairs of
  each head's channels where Transformers rotates the two halves, so the converter reorders the
  rows of q_proj and k_proj within every head. The rows of a LoRA update B @ A are the rows of B:
  lora_B of q/k gets the same reordering, lora_A none (that is what the LoRA converter's tensor
  wrapper does when the model converter permutes the weight). Qwen2 needs no reordering.
- Tensor names come from the gguf package's own map (`gguf.get_tensor_name_map`), not a table of ours.

Only the architectures listed in `ARCHITECTURES` are exported (the llama.cpp-supported ones this
trainer is tested with); anything else is refused with one line naming llama.cpp's converter.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from shared.errors import ConfigError, ModelError

# Transformers architecture -> (llama.cpp architecture name, q/k rows reordered for its RoPE).
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
}

# The pre-tokenizer regexes of the byte-level BPE tokenizers llama.cpp knows, as their
# tokenizer.json files spell them, and the `tokenizer.ggml.pre` name llama.cpp gives each.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPLIT_PRE = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}

CONVERTER_HINT = "llama.cpp's own convert_hf_to_gguf.py / convert_lora_to_gguf.py can convert it"


@dataclass(frozen=True)
class ModelShape:
    """What the exports need to know about a base model, from its config.json."""

    hf_arch: str
    arch: str  # llama.cpp architecture name
    reorder_qk: bool
    n_blocks: int
    n_head: int
    n_head_kv: int
    config: dict


def model_shape(config: dict, where: str) -> ModelShape:
    """The base model's llama.cpp architecture, or one line saying it is not exported."""
    archs = config.get("architectures") or []
    hf_arch = next((a for a in archs if a in ARCHITECTURES), None)
    if hf_arch is None:
        what = ", ".join(archs) or config.get("model_type") or "unknown"
        raise ModelError(
            f"{where}: GGUF export supports {', '.join(sorted(ARCHITECTURES))}; this model is {what}, "
            f"so no GGUF was written ({CONVERTER_HINT} if llama.cpp supports it)"
        )
    arch, reorder = ARCHITECTURES[hf_arch]
    n_head = int(config["num_attention_heads"])
    return ModelShape(
        hf_arch=hf_arch,
        arch=arch,
        reorder_qk=reorder,
        n_blocks=int(config["num_hidden_layers"]),
        n_head=n_head,
        n_head_kv=int(config.get("num_key_value_heads") or n_head),
        config=config,
    )


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{what}: {path} does not exist") from None
    except (ValueError, OSError) as exc:
        raise ModelError(f"{what}: {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{what}: {path} is not a JSON object")
    return data


def check_gguf_exportable(base_model: Path, *, use_dora: bool = False, use_rslora: bool = False) -> ModelShape:
    """Pre-flight for the GGUF deploy targets: refuse, before training, what could not be exported."""
    shape = model_shape(_read_json(Path(base_model) / "config.json", "base_model"), f"base_model {base_model}")
    if use_dora:
        raise ConfigError(
            "use_dora: llama.cpp LoRA adapters have no DoRA magnitude vectors, so a DoRA adapter cannot be "
            "exported to GGUF; set use_dora: false, or drop the llama.cpp/Ollama deploy targets"
        )
    return shape


def _ggml_arch(name: str):
    import gguf

    return next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == name)


def _reorder_rows(t, n_head: int):
    """llama.cpp's q/k row order: within each head, the two halves' rows interleaved (row i of the
    first half, then row i of the second half, ...)."""
    rows = t.shape[0]
    return t.reshape(n_head, 2, rows // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def _reordered(name: str, t, shape: ModelShape):
    """`t` as llama.cpp lays it out when `name` (a Transformers weight/bias name) is q_proj or k_proj."""
    if not shape.reorder_qk:
        return t
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        return _reorder_rows(t, shape.n_head)
    if name.endswith(("k_proj.weight", "k_proj.bias")):
        return _reorder_rows(t, shape.n_head_kv)
    return t


# ---------------------------------------------------------------------------------------------
# LoRA adapter


@dataclass
class AdapterGGUF:
    path: Path
    arch: str
    alpha: float  # what the file says (rsLoRA folded in)
    rank: int
    tensors: int


def _adapter_alpha(cfg: dict, where: str) -> tuple[float, int]:
    """(alpha to write, rank). llama.cpp scales by alpha / r; rsLoRA scales by alpha / sqrt(r), so
    its alpha is written as alpha * sqrt(r) (llama.cpp's converter ignores rsLoRA, which would
    silently give an rsLoRA adapter the wrong strength)."""
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ModelError(f"{where}: a {cfg.get('peft_type')} adapter is not a LoRA; only LoRA adapters export to GGUF")
    if cfg.get("use_dora"):
        raise ModelError(f"{where}: DoRA adapters cannot be exported to GGUF (llama.cpp has no DoRA magnitude vectors)")
    if (cfg.get("bias") or "none") != "none":
        raise ModelError(f"{where}: bias={cfg['bias']!r}: llama.cpp LoRA adapters carry no bias terms")
    if cfg.get("modules_to_save"):
        raise ModelError(
            f"{where}: modules_to_save={cfg['modules_to_save']}: fully trained modules cannot go into a "
            "llama.cpp LoRA adapter; export the merged model instead"
        )
    if cfg.get("alpha_pattern"):
        raise ModelError(f"{where}: alpha_pattern: a llama.cpp adapter has one alpha for all layers")
    rank = int(cfg["r"])
    alpha = float(cfg.get("lora_alpha", rank))
    if cfg.get("use_rslora"):
        if cfg.get("rank_pattern"):
            raise ModelError(f"{where}: rsLoRA with rank_pattern has no single llama.cpp alpha")
        alpha *= math.sqrt(rank)
    return alpha, rank


def write_adapter_gguf(adapter_dir: Path, base_model: Path, out: Path, *, name: str | None = None) -> AdapterGGUF:
    """Convert the PEFT adapter in `adapter_dir` (adapter_config.json + adapter_model.safetensors)
    into a llama.cpp LoRA adapter at `out`. `base_model` is the Transformers folder it was trained on
    (only its config.json is read). `name` (`general.name`; default: the folder's name) is the
    adapter's, for a folder being published under a temporary name."""
    import gguf
    import numpy as np
    from safetensors.torch import load_file

    adapter_dir, out = Path(adapter_dir), Path(out)
    where = f"adapter {adapter_dir}"
    shape = model_shape(_read_json(Path(base_model) / "config.json", "base_model"), f"base_model {base_model}")
    alpha, rank = _adapter_alpha(_read_json(adapter_dir / "adapter_config.json", "adapter"), where)
    weights_file = adapter_dir / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise ModelError(f"{where}: no adapter_model.safetensors (a .bin adapter: re-save it with safe_serialization)")
    weights = load_file(str(weights_file))
    names = gguf.get_tensor_name_map(_ggml_arch(shape.arch), shape.n_blocks)

    pairs: dict[str, dict[str, object]] = {}
    for key, tensor in weights.items():
        if "lora_magnitude_vector" in key:
            raise ModelError(f"{where}: DoRA adapters cannot be exported to GGUF (llama.cpp has no DoRA magnitude vectors)")
        for part in ("lora_A", "lora_B"):
            marker = f".{part}.weight"
            if key.endswith(marker):
                module = key[: -len(marker)].removeprefix("base_model.model.")
                pairs.setdefault(module, {})[part] = tensor
                break
        else:
            raise ModelError(
                f"{where}: {key} is not a LoRA A/B weight (trained embeddings or extra modules do not fit a "
                "llama.cpp LoRA adapter; export the merged model instead)"
            )

    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[_ggml_arch(shape.arch)])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(name or adapter_dir.name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for module in sorted(pairs):
        pair = pairs[module]
        if set(pair) != {"lora_A", "lora_B"}:
            raise ModelError(f"{where}: {module} has only its {', '.join(pair)} weight")
        target = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if target is None:
            raise ModelError(f"{where}: {module} has no llama.cpp {shape.arch} tensor, so the adapter cannot be exported")
        a = pair["lora_A"].float()
        b = _reordered(module + ".weight", pair["lora_B"].float(), shape)
        writer.add_tensor(target + ".lora_a", np.ascontiguousarray(a.numpy(), dtype=np.float32))
        writer.add_tensor(target + ".lora_b", np.ascontiguousarray(b.numpy(), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return AdapterGGUF(out, shape.arch, alpha, rank, 2 * len(pairs))


def export_adapter_gguf(adapter_dir: Path, base_model: Path, folder: Path, stem: str) -> Path:
    """`folder/<stem>-lora.gguf` (or `_2`, ... if taken), never over an existing file."""
    from shared.files import publish_new

    return publish_new(
        Path(folder), f"{stem}-lora", ".gguf", lambda tmp, _stem: write_adapter_gguf(adapter_dir, base_model, tmp)
    )


# ---------------------------------------------------------------------------------------------
# Model (base or merged)


def _rope_theta(config: dict) -> float | None:
    params = config.get("rope_parameters") or {}
    return config.get("rope_theta", params.get("rope_theta"))


def _rope_scaling(config: dict) -> dict:
    """The rope scaling of the config (transformers 5 `rope_parameters` or the older `rope_scaling`)."""
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    kind = scaling.get("rope_type", scaling.get("type")) or "default"
    return {**scaling, "rope_type": kind}


def _llama3_rope_factors(config: dict, scaling: dict):
    """Per-frequency RoPE factors of LLaMA 3.1's "llama3" scaling (llama.cpp's `rope_freqs` tensor):
    long wavelengths divided by `factor`, short ones kept, a smooth blend between."""
    import torch

    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    base = _rope_theta(config) or 10000.0
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = scaling.get("factor", 8.0)
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_ctx = scaling.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def _add_hparams(writer, shape: ModelShape, file_type) -> list[tuple[str, object]]:
    """Hyper-parameters as llama.cpp's converter writes them; returns extra tensors (rope factors)."""
    import gguf

    c = shape.config
    writer.add_block_count(shape.n_blocks)
    if c.get("max_position_embeddings") is not None:
        writer.add_context_length(int(c["max_position_embeddings"]))
    writer.add_embedding_length(int(c["hidden_size"]))
    if c.get("intermediate_size") is not None:
        writer.add_feed_forward_length(int(c["intermediate_size"]))
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    if (theta := _rope_theta(c)) is not None:
        writer.add_rope_freq_base(float(theta))
    if c.get("rms_norm_eps") is not None:
        writer.add_layer_norm_rms_eps(float(c["rms_norm_eps"]))
    if c.get("head_dim") is not None:
        writer.add_key_length(int(c["head_dim"]))
        writer.add_value_length(int(c["head_dim"]))
    writer.add_file_type(file_type)
    if shape.arch == "llama":
        writer.add_vocab_size(int(c["vocab_size"]))
        writer.add_rope_dimension_count(int(c.get("head_dim") or c["hidden_size"] // shape.n_head))
    scaling = _rope_scaling(c)
    kind = scaling["rope_type"]
    if kind == "default":
        return []
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
        return []
    if kind == "llama3" and shape.arch == "llama":
        return [(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", _llama3_rope_factors(c, scaling))]
    raise ModelError(f"config.json: rope scaling {kind!r} is not exported to GGUF here; {CONVERTER_HINT}")


def _bpe_pre(tokenizer_json: dict, where: str) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (`tokenizer.ggml.pre`), read from its
    structure. (llama.cpp's converter recognises known tokenizers by hashing a test string's tokens;
    a fine-tune keeps its base's pre-tokenizer, and a structural match also covers small test
    tokenizers that no hash table lists.)"""
    model = tokenizer_json.get("model") or {}
    decoder = tokenizer_json.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise ModelError(
            f"{where}: only byte-level BPE tokenizers (LLaMA 3, Qwen2, GPT-2 style) are exported to GGUF here; "
            f"this is a {model.get('type', 'unknown')} tokenizer"
            + (" with byte fallback (SentencePiece style)" if model.get("byte_fallback") else "")
            + f"; {CONVERTER_HINT}"
        )
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers") or []
        kinds = [p.get("type") for p in parts]
        if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
            regex = (parts[0].get("pattern") or {}).get("Regex")
            if regex in SPLIT_PRE:
                return SPLIT_PRE[regex]
    raise ModelError(f"{where}: its pre-tokenizer is not one llama.cpp is known to reproduce here; {CONVERTER_HINT}")


def _add_vocab(writer, model_dir: Path, config: dict, chat_template: str | None) -> None:
    """The tokenizer as llama.cpp's converter writes a byte-level BPE one: token list and types,
    merges, special ids, add-BOS/EOS flags and the chat template."""
    import gguf
    from transformers import AutoTokenizer

    where = f"tokenizer of {model_dir}"
    if not (model_dir / "tokenizer.json").is_file():
        raise ModelError(f"{where}: no tokenizer.json (a fast tokenizer is needed for GGUF export)")
    pre = _bpe_pre(_read_json(model_dir / "tokenizer.json", "tokenizer"), where)
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    vocab_size = int(config.get("vocab_size") or len(tok.get_vocab()))
    reverse = {i: t for t, i in tok.get_vocab().items()}
    if max(reverse) >= vocab_size:
        raise ModelError(f"{where}: token id {max(reverse)} is past the model's vocab_size {vocab_size}")
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            special = decoder[i].special if i in decoder else False
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    # Add BOS/EOS exactly where the Transformers tokenizer adds them, which is what training saw.
    probe = tok("a").input_ids
    special.add_special_token["bos"] = tok.bos_token_id is not None and probe[:1] == [tok.bos_token_id]
    special.add_special_token["eos"] = tok.eos_token_id is not None and probe[-1:] == [tok.eos_token_id]
    if chat_template is not None:
        special.chat_template = chat_template
    special.add_to_gguf(writer, quiet=True)


def check_model_exportable(model_dir: Path, what: str = "model") -> ModelShape:
    """What `write_model_gguf` would refuse, read from the folder's JSON files and file names only (no
    weights, no tokenizer library): the pre-flight of `gguf_base`, before any training."""
    model_dir = Path(model_dir)
    shape = model_shape(_read_json(model_dir / "config.json", what), f"{what} {model_dir}")
    if not sorted(model_dir.glob("model*.safetensors")):
        raise ModelError(f"{what} {model_dir}: no model*.safetensors weights (GGUF export reads safetensors only)")
    kind = _rope_scaling(shape.config)["rope_type"]
    if kind not in ("default", "linear") and not (kind == "llama3" and shape.arch == "llama"):
        raise ModelError(f"{what} {model_dir}: rope scaling {kind!r} is not exported to GGUF here; {CONVERTER_HINT}")
    where = f"{what} {model_dir}: its tokenizer"
    if not (model_dir / "tokenizer.json").is_file():
        raise ModelError(f"{where}: no tokenizer.json (a fast tokenizer is needed for GGUF export)")
    _bpe_pre(_read_json(model_dir / "tokenizer.json", "tokenizer"), where)
    return shape


def write_model_gguf(model_dir: Path, out: Path, *, outtype: str = "f16", chat_template: str | None = None) -> Path:
    """Convert a Transformers model folder (safetensors) of a supported architecture into a GGUF model
    llama.cpp loads. `outtype` f16 (2-D weights in F16, the rest F32) or f32. `chat_template`
    overrides the tokenizer's (pass the template the job trained with)."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    model_dir, out = Path(model_dir), Path(out)
    if outtype not in ("f16", "f32"):
        raise ConfigError(f"gguf outtype: {outtype!r}; use f16 or f32")
    shape = check_model_exportable(model_dir)
    files = sorted(model_dir.glob("model*.safetensors"))
    file_type = gguf.LlamaFileType.MOSTLY_F16 if outtype == "f16" else gguf.LlamaFileType.ALL_F32
    names = gguf.get_tensor_name_map(_ggml_arch(shape.arch), shape.n_blocks)
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[_ggml_arch(shape.arch)])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(model_dir.name)
    extra = _add_hparams(writer, shape, file_type)
    _add_vocab(writer, model_dir, shape.config, chat_template)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key.endswith(".rotary_emb.inv_freq"):
                    continue
                target = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if target is None:
                    raise ModelError(f"model {model_dir}: {key} has no llama.cpp {shape.arch} tensor")
                data = _reordered(key, f.get_tensor(key).float(), shape).numpy()
                f32 = data.ndim == 1 or target.endswith("_norm.weight")
                if outtype == "f16" and not f32 and key.endswith(".weight") and data.ndim >= 2:
                    writer.add_tensor(target, data.astype(np.float16))
                else:
                    writer.add_tensor(target, data.astype(np.float32))
    for target, tensor in extra:
        writer.add_tensor(target, tensor.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def export_model_gguf(model_dir: Path, folder: Path, stem: str, *, outtype: str = "f16",
                      chat_template: str | None = None) -> Path:
    """`folder/<stem>-<outtype>.gguf` (or `_2`, ... if taken), never over an existing file."""
    from shared.files import publish_new

    return publish_new(
        Path(folder), f"{stem}-{outtype}", ".gguf",
        lambda tmp, _stem: write_model_gguf(model_dir, tmp, outtype=outtype, chat_template=chat_template),
    )
