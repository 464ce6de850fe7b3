"""Finding and loading open_clip weights from this machine only.

Weights come from a file the person names (`--weights`, or `--pretrained` given a path), a folder with
`open_clip_config.json` and a checkpoint (what the hub serves for a model), or a pretrained tag whose
file is already in the Hugging Face cache or open_clip's own `~/.cache/clip`. The cache is searched
with `huggingface_hub.try_to_load_from_cache`, which only looks at the disk; open_clip is then given
the file's path, never a tag, so its downloader never runs. Nothing found: one `ModelError` saying
what to give and where to put it.

`--model` is an open_clip architecture name (`ViT-B-32`) or the path of a model config JSON
(`{"embed_dim", "vision_cfg", "text_cfg"}`), registered with `open_clip.add_model_config`.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from shared.autolabel.names import ask
from shared.autolabel.names import name as option_name
from shared.errors import ModelError, UserError

DEFAULT_MODEL = "ViT-B-32"
PREFERRED_TAGS = {"ViT-B-32": "laion2b_s34b_b79k"}  # looked for first, and named when nothing is found
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
HF_DEFAULT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin")


@dataclass
class ResolvedWeights:
    """What to hand open_clip: an architecture name (or `local-dir:` folder) and a local file."""

    model_name: str
    checkpoint: Path | None  # None only for `local-dir:` folders, where open_clip finds the file
    source: str  # for messages: where the weights were found
    tag_cfg: dict = field(default_factory=dict)  # preprocessing/quick_gelu of a pretrained tag


def _register_config_file(path: Path) -> str:
    import open_clip

    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{option_name('model')}: {path} is not a readable model config JSON ({exc})") from None
    if not all(key in cfg for key in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ModelError(f"{option_name('model')}: {path} needs the keys embed_dim, vision_cfg and text_cfg (an open_clip model config)")
    if open_clip.get_model_config(path.stem) != cfg:  # registering again would only grow open_clip's list
        open_clip.add_model_config(path)
    return path.stem


def _architecture(model: str) -> str:
    import open_clip

    if model.lower().endswith(".json"):
        path = Path(model).expanduser()
        if not path.is_file():
            raise ModelError(f"{option_name('model')}: config file {path} not found")
        return _register_config_file(path)
    name = model.replace("/", "-")
    if open_clip.get_model_config(name) is None:
        raise ModelError(
            f"{option_name('model')}: unknown open_clip architecture {model!r}; use a name from open_clip.list_models() "
            f"(e.g. {DEFAULT_MODEL}) or the path of a model config .json"
        )
    return name


def _looks_like_path(value: str) -> bool:
    return os.sep in value or "/" in value or value.lower().endswith(CHECKPOINT_SUFFIXES) or Path(value).exists()


def _from_path(arch_or_model: str, weights: Path) -> ResolvedWeights:
    weights = weights.expanduser()
    if weights.is_dir():
        if (weights / "open_clip_config.json").is_file():
            if not any(p.suffix in (".safetensors", ".bin", ".pth") for p in weights.iterdir()):
                raise ModelError(f"{option_name('weights')}: {weights} has open_clip_config.json but no .safetensors/.bin/.pth weights")
            return ResolvedWeights(f"local-dir:{weights}", None, str(weights))
        raise ModelError(
            f"{option_name('weights')}: {weights} is a folder without open_clip_config.json; give the checkpoint file itself"
        )
    if not weights.is_file():
        raise ModelError(f"{option_name('weights')}: {weights} not found; give the path of an open_clip checkpoint (.safetensors, .bin, .pt)")
    return ResolvedWeights(_architecture(arch_or_model), weights, str(weights))


def _cached_tag_file(arch: str, tag: str, cache_dir: str | None = None) -> Path | None:
    """The local file of a pretrained tag, looked up on disk only."""
    from open_clip.pretrained import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch, tag)
    if not cfg:
        return None
    hf_hub = cfg.get("hf_hub", "")
    if hf_hub:
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(hf_hub)  # "org/repo/" names the repo's default file
        candidates = (f"{filename.rsplit('.', 1)[0]}.safetensors", filename) if filename else HF_DEFAULT_FILES
        for name in candidates:
            found = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
    url = cfg.get("url", "")
    if url:
        candidate = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if candidate.is_file():
            return candidate
    return None


def _tags(arch: str) -> list[str]:
    """The pretrained tags of `arch`, the recommended one first."""
    from open_clip.pretrained import list_pretrained_tags_by_model

    tags = list_pretrained_tags_by_model(arch)
    preferred = PREFERRED_TAGS.get(arch)
    return sorted(tags, key=lambda t: t != preferred)


def _where_to_put(arch: str, tag: str | None, cache_dir: str | None) -> str:
    from huggingface_hub import constants
    from open_clip.pretrained import get_pretrained_cfg

    tags = [tag] if tag else _tags(arch)
    for t in tags:
        hub = (get_pretrained_cfg(arch, t) or {}).get("hf_hub", "")
        if hub:
            repo = hub.rstrip("/").split("/")
            repo_id = "/".join(repo[:2])
            cache = cache_dir or constants.HF_HUB_CACHE
            folder = f"models--{repo_id.replace('/', '--')}"
            return (
                f", or put the {arch} '{t}' weights in the Hugging Face cache: on a machine with internet run "
                f"`hf download {repo_id}`, then copy its folder {folder} into {cache} here"
            )
    for t in tags:
        url = (get_pretrained_cfg(arch, t) or {}).get("url", "")
        if url:
            clip_cache = cache_dir or os.path.expanduser("~/.cache/clip")
            return f", or put the {arch} '{t}' file {os.path.basename(url)} into {clip_cache}"
    return ""


def resolve_weights(
    model: str = DEFAULT_MODEL, pretrained: str | None = None, weights: str | Path | None = None,
    cache_dir: str | None = None,
) -> ResolvedWeights:
    """Which local file to load for `model`; raises one `ModelError` when there is none."""
    if weights is not None:
        return _from_path(model, Path(weights))
    if pretrained and _looks_like_path(pretrained):
        return _from_path(model, Path(pretrained))
    arch = _architecture(model)
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    if pretrained and not get_pretrained_cfg(arch, pretrained):
        known = ", ".join(list_pretrained_tags_by_model(arch)) or "none"
        raise ModelError(f"{option_name('pretrained')}: {pretrained!r} is not a tag of {arch} (known tags: {known}) nor a file")
    tags = [pretrained] if pretrained else _tags(arch)
    for tag in tags:
        found = _cached_tag_file(arch, tag, cache_dir)
        if found is not None:
            return ResolvedWeights(arch, found, f"{arch} '{tag}' from the local cache ({found})",
                                   get_pretrained_cfg(arch, tag))
    which = f"{arch} '{pretrained}'" if pretrained else arch
    raise ModelError(
        f"no open_clip weights for {which} on this machine (nothing is downloaded): "
        f"{ask('weights', '/path/to/open_clip_model.safetensors')} (a checkpoint for {option_name('model')} {model})"
        + _where_to_put(arch, pretrained, cache_dir)
    )


def pick_device(device: str = "auto") -> str:
    import torch

    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{option_name('device')} {device}: no CUDA device found here; use {option_name('device')} cpu")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"{option_name('device')} mps: no Apple GPU found here; use {option_name('device')} cpu")
    try:
        torch.device(device)
    except RuntimeError:
        raise UserError(f"{option_name('device')} {device!r}: not a device; use auto, cpu, cuda, cuda:N or mps") from None
    return device


@dataclass
class ClipModel:
    """A loaded open_clip model with its image transform and tokenizer."""

    model: object
    preprocess: object
    tokenizer: object
    device: str
    source: str
    _text_cache: dict = field(default_factory=dict, repr=False)

    def _autocast(self):
        import contextlib

        import torch

        if self.device.startswith("cuda"):
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def encode_texts(self, prompts: list[str], batch_size: int = 256):
        """L2-normalised text features, [len(prompts), dim], float32 on the CPU.

        Remembered per prompt list: the vocabulary costs as much as a few hundred images on a CPU, and a
        caller that keeps the model (a daemon) labels the next folder without paying it again.
        """
        import torch

        key = tuple(prompts)
        if key in self._text_cache:
            return self._text_cache[key]
        out = []
        with torch.inference_mode(), self._autocast():
            for start in range(0, len(prompts), batch_size):
                tokens = self.tokenizer(prompts[start : start + batch_size]).to(self.device)
                features = _encode_text_trimmed(self.model, tokens)
                out.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu())
        self._text_cache = {key: torch.cat(out)}  # one vocabulary at a time is all a run needs
        return self._text_cache[key]

    def encode_images(self, pixels):
        """L2-normalised image features for a preprocessed batch [B, 3, H, W]."""
        import torch

        with torch.inference_mode(), self._autocast():
            features = self.model.encode_image(pixels.to(self.device))
            return torch.nn.functional.normalize(features.float(), dim=-1).cpu()

    @property
    def logit_scale(self) -> float:
        """CLIP's learned temperature (100 for trained models), capped as CLIP caps it in training."""
        import math

        scale = getattr(self.model, "logit_scale", None)
        return min(100.0, math.exp(float(scale.detach()))) if scale is not None else 100.0


def _encode_text_trimmed(model, tokens):
    """`model.encode_text(tokens)`, computed only up to the last end-of-text token of the batch.

    A caption phrase is a handful of tokens padded to 77. With CLIP's causal attention mask, the
    positions after a prompt's end-of-text token cannot change the features read at that token, so
    cutting them off gives the same features for a fraction of the work (3x less for ViT-B-32 on a
    CPU). Models this does not hold for (no causal mask, other pooling, custom text towers) run in full.
    """
    import open_clip
    import torch

    pool = getattr(model, "text_pool_type", None)
    if not isinstance(model, open_clip.CLIP) or getattr(model, "attn_mask", None) is None or pool != "argmax":
        return model.encode_text(tokens)
    length = int(tokens.argmax(dim=-1).max()) + 1  # argmax pooling: the end-of-text token has the top id
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[range(x.shape[0]), tokens.argmax(dim=-1)]
    if isinstance(model.text_projection, torch.nn.Linear):
        return model.text_projection(x)
    return x @ model.text_projection if model.text_projection is not None else x


@contextmanager
def _hub_offline():
    """Hub offline mode while open_clip builds the model: models with a Hugging Face text tower or
    tokenizer (e.g. xlm-roberta ones) would otherwise fetch its config from the hub."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def load_clip(
    model: str = DEFAULT_MODEL, pretrained: str | None = None, weights: str | Path | None = None,
    device: str = "auto", cache_dir: str | None = None,
) -> ClipModel:
    import open_clip

    resolved = resolve_weights(model, pretrained, weights, cache_dir)
    device = pick_device(device)
    tag = resolved.tag_cfg  # a tag's own preprocessing, since open_clip only sees the file's path
    try:
        with _hub_offline():
            clip, _, preprocess = open_clip.create_model_and_transforms(
                resolved.model_name,
                pretrained=str(resolved.checkpoint) if resolved.checkpoint else None,
                device=device,
                force_quick_gelu=bool(tag.get("quick_gelu", False)),
                image_mean=tag.get("mean"),
                image_std=tag.get("std"),
                image_interpolation=tag.get("interpolation"),
                image_resize_mode=tag.get("resize_mode"),
                pretrained_text=False,  # a full checkpoint is loaded; never fetch tower weights
                weights_only=True,
            )
            tokenizer = open_clip.get_tokenizer(resolved.model_name)
    except Exception as exc:  # noqa: BLE001 - open_clip reports a mismatched file with many types, asserts too
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"{resolved.source}: cannot load as open_clip {resolved.model_name} weights ({first[:300]}); "
            f"check that {option_name('model')} matches the checkpoint"
        ) from None
    clip.eval()
    return ClipModel(clip, preprocess, tokenizer, device, resolved.source)
