"""A GGUF file as a base model: recognised (by its magic bytes or suffix) and refused with one line.

GGUF is an inference format: llama.cpp and Ollama run LLMs from it, ComfyUI-GGUF runs quantized
image models (Flux, SD) from it. LoRA training needs the original weights (a Transformers folder for
an LLM, a .safetensors checkpoint or diffusers folder for an image model), so a GGUF `base_model` is
refused before anything else reads it, with where to get the trainable weights. Shared by both
families (the pre-flight's model-family step and the LLM loader); the `gguf` package reads the
file's header for the hint only, and is imported only when a GGUF file is there.
"""

from __future__ import annotations

from pathlib import Path

from shared.errors import ModelError

GGUF_MAGIC = b"GGUF"
# `general.architecture` of the image models ComfyUI-GGUF (city96) loads from GGUF (its loader's
# IMG_ARCH_LIST): a GGUF of one of these is a quantized SD/Flux-style model, not an LLM.
IMAGE_GGUF_ARCHS = frozenset({"flux", "sd1", "sdxl", "sd3", "aura", "hidream", "cosmos", "ltxv", "hyvid", "wan",
                              "lumina2", "qwen_image"})


def _gguf_identity(path: Path) -> tuple[str, str]:
    """What a GGUF file says it is: (its general.name / base model repo, its general.architecture),
    for the refusal's hint; empty where it does not say."""
    try:
        import gguf

        reader = gguf.GGUFReader(str(path))
        name = ""
        for key in ("general.base_model.0.repo_url", "general.source.repo_url", "general.base_model.0.name", "general.name"):
            field = reader.get_field(key)
            if field is not None:
                name = str(field.contents())
                break
        arch = reader.get_field("general.architecture")
        return name, str(arch.contents()) if arch is not None else ""
    except Exception:  # a truncated or foreign file: the refusal stands without the hint
        return "", ""


def refuse_gguf_base(base_model: Path) -> None:
    """Raise one line if `base_model` is a GGUF file (by its magic bytes, whatever its name), or a folder
    with GGUF files and no config.json; return if it is neither."""
    path = Path(base_model)
    gguf_file = None
    if path.is_file():
        with open(path, "rb") as fh:
            if fh.read(4) == GGUF_MAGIC or path.suffix.lower() == ".gguf":
                gguf_file = path
    elif path.is_dir() and not (path / "config.json").is_file():
        found = sorted(path.glob("*.gguf"))
        gguf_file = found[0] if found else None
    if gguf_file is None:
        return
    name, arch = _gguf_identity(gguf_file)
    hint = f" (this one says it is {name})" if name else ""
    if arch in IMAGE_GGUF_ARCHS:
        raise ModelError(
            f"base_model: {gguf_file} is a GGUF file of a {arch} image model{hint}, a quantized inference format "
            "(ComfyUI-GGUF); LoRA training needs the original weights: set base_model to the model's .safetensors "
            "checkpoint (or its diffusers folder)"
        )
    raise ModelError(
        f"base_model: {gguf_file} is a GGUF file{hint}, the llama.cpp/Ollama inference format; LoRA training "
        "needs the model's Transformers weights: download its original repository (config.json, "
        "tokenizer files, *.safetensors), e.g. `huggingface-cli download <org>/<model> --local-dir <folder>`, "
        "and set base_model to that folder"
    )
