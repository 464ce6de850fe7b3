"""The pre-flight: every check a training job can get without loading a weight, in one order, once.

The daemon runs it when a job is submitted (nothing is queued unless it passes) and `train` runs it
before anything heavy loads:

1. the values, with a `preset`'s keys under the config's own: types, ranges, choices and cross-field
   rules, from the declarations (shared/schema); no file is touched;
2. the roots (the daemon): every path against its read or write roots, before it is opened or stat-ed;
3. existence: the files and folders the job reads, and no file where a folder is to be written;
4. the model family, from the checkpoint's header (shared/model_family.py; never a pickle);
5. the family's rules: which keys apply to it (an SD setting on an LLM or Flux job is refused), and the
   rules declared with `family=True` beside the settings they concern (resolution: the multiple the
   model's own VAE and UNet, or Flux's packing, need; the separate files a Flux transformer file needs; a
   preset made for the model's family); for Flux also the separate files' headers and the T5 tokenizer's
   folder (kept in the job's config);
6. the data set: SD and Flux images and captions (image headers only; the regularisation and validation
   images too), LLM rows (parsed, not tokenized; with a preference `objective`, as chosen/rejected pairs);
7. the LLM deploy targets: the base's architecture exports to GGUF (config.json), `textgen_dir` is a
   text-generation-webui folder and its loras folder lies inside the write roots too.

What passes is stored as the canonical dict (every key, paths absolute, `task` resolved); the worker and
the ranks rebuild `TrainConfig` from it (`TrainConfig.from_canonical`) without checking again. Not seen
here, because it needs the libraries the daemon does not import: whether a Transformers folder's
model type is a causal LM and has a tokenizer, whether its chat template can be written as an Ollama
TEMPLATE (it is rendered by the tokenizer), and what CUDA offers (adamw8bit, load_in_4bit); the
worker checks those first, before any weight loads. No torch, no transformers: the daemon imports this.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared import schema
from shared.config import TrainConfig, override_origins, read_config_file
from shared.errors import ConfigError, UserError
from shared.model_family import ModelFamily, model_family
from shared.roots import Roots, confine


class PathNotAllowed(ConfigError):
    """A path lies outside the daemon's roots. `key` names the setting."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


@dataclass
class Checked:
    """A config the pre-flight accepted."""

    config: TrainConfig
    canonical: dict[str, Any]
    family: ModelFamily
    items: int  # images (SD) or rows (LLM) found

    @property
    def task(self) -> str:
        return self.family.task


def check(data: Mapping[str, Any], *, source: str, base_dir: Path | None = None,
          origins: Mapping[str, str] | None = None, roots: Roots | None = None,
          require_absolute: bool = False) -> Checked:
    """Run the whole pre-flight on a mapping of config keys; a UserError (one line, naming the key and
    where its value came from) on the first problem. `roots` confines the paths (the daemon's);
    `require_absolute` refuses relative paths (a client that gave no base folder)."""
    from shared.presets import apply_preset, preset_origins

    given = set(data)  # the user's own keys (a preset's are checked by the preset's family rule)
    origins = preset_origins(dict(data), source, origins)
    data = apply_preset(dict(data), source)  # the preset's keys first, the config's own over them

    def where(key: str) -> str:
        return origins.get(key, source)

    values = schema.coerce_config(data, source=source, base_dir=base_dir, origins=origins,
                                  require_absolute=require_absolute)
    if roots is not None:
        confine_paths(values, schema.TRAIN, roots)
    check_exist(values, schema.TRAIN, where, folders_to_write=True)
    family = model_family(values["base_model"], values["model_config"], values["task"])
    check_family(values, given, family, where)
    if family.task == "flux":
        values["t5_tokenizer"] = check_flux_files(values, where, roots)
    items = scan_data(values, family)
    if family.task == "llm":
        check_llm_targets(values, where, roots)
    values["task"] = family.task
    canonical = schema.canonical(values)
    return Checked(TrainConfig.from_canonical(canonical), canonical, family, items)


def confine_paths(values: Mapping[str, Any], table: Mapping[str, schema.Setting], roots: Roots,
                  extra: list[tuple[str, Path | None, str]] = ()) -> None:
    """Every path setting against its roots (a path setting that declares no access is a read), then
    the `extra` (key, path, access) triples; PathNotAllowed on the first outside its roots."""
    checks = [(name, values[name], s.path or "read") for name, s in table.items() if s.type is Path]
    for key, value, access in [*checks, *extra]:
        if value is None:
            continue
        problem = confine(Path(value), roots.read if access == "read" else roots.write, key, access)
        if problem:
            raise PathNotAllowed(key, problem)


def check_exist(values: Mapping[str, Any], table: Mapping[str, schema.Setting], where: Callable[[str], str],
                folders_to_write: bool = False, label: Callable[[str], str] = str) -> None:
    """The files and folders that must exist do, and are of the declared kind; with `folders_to_write`,
    no written path is an existing file (they are all folders). `label` names a setting as the client
    calls it (a host's input name)."""
    for key, setting in table.items():
        value = values[key]
        if value is None or setting.type is not Path:
            continue
        name = label(key)
        path = Path(value)
        try:
            exists, is_dir = path.exists(), path.is_dir()
        except (OSError, ValueError):
            exists = is_dir = False
        if setting.exists and not exists:
            raise ConfigError(f"{where(key)}: {name}: {path} does not exist")
        if setting.exists == "dir" and not is_dir:
            raise ConfigError(f"{where(key)}: {name}: {path} is not a folder")
        if setting.exists == "file" and is_dir:
            raise ConfigError(f"{where(key)}: {name}: {path} is a folder; give the file")
        if folders_to_write and setting.path == "write" and exists and not is_dir:
            raise ConfigError(f"{where(key)}: {name}: {path} is a file; give a folder")


def _a(words: str) -> str:
    return f"an {words}" if words[0] in "aeiouAEIOLS" else f"a {words}"  # "an SD", "an LLM", "an auto-label"


def check_family(values: Mapping[str, Any], given: set[str], family: ModelFamily, where: Callable[[str], str]) -> None:
    """The model family's rules: every given key applies to it, and its declared family rules hold
    (the resolution multiple its VAE and UNet need, declared beside `resolution`)."""
    for name, setting in schema.TRAIN.items():
        if name in given and family.task not in setting.tasks:
            kinds = " and ".join(name for t, name in schema.TASK_NAMES.items() if t in setting.tasks)
            raise ConfigError(f"{where(name)}: {name} is {_a(kinds)} setting and does not apply here: base_model "
                              f"{values['base_model']} is {family.describe()}; remove {name}")
    for rule in schema.FAMILY_RULES:
        problem = family.task in rule.tasks and rule.check(values, family)
        if problem:
            raise ConfigError(f"{where(rule.keys[0])}: {problem}")


def check_flux_files(values: Mapping[str, Any], where: Callable[[str], str], roots: Roots | None) -> Path:
    """The separate Flux files are the parts they are named for (from their headers), and the T5 tokenizer
    is found (the `t5_tokenizer` key, or beside the model files) inside the roots: returns its folder,
    which the job then keeps (what the trainer loads is what was checked)."""
    from shared.flux.tokenizers import find_t5_tokenizer  # paths only: no transformers here
    from shared.model_family import FLUX_FILES, flux_file_problem

    for key in FLUX_FILES:
        problem = values[key] is not None and flux_file_problem(key, values[key])
        if problem:
            raise ConfigError(f"{where(key)}: {problem}")
    near = [values["base_model"], *(values[k] for k in FLUX_FILES if values[k] is not None)]
    try:
        folder = find_t5_tokenizer(near, values["t5_tokenizer"])
    except UserError as exc:
        raise ConfigError(f"{where('t5_tokenizer')}: {exc}") from None
    if roots is not None:
        confine_paths({}, {}, roots, extra=[("t5_tokenizer", folder, "read")])
    return folder


def scan_data(values: Mapping[str, Any], family: ModelFamily) -> int:
    """Read the data set as the trainer will, short of decoding images or tokenizing text: the number of
    images (SD, Flux) or rows (LLM)."""
    if family.task in ("sd", "flux"):
        from shared.images.dataset import scan_dataset  # captions and image headers only (PIL, no torch)
        from shared.images.regularisation import scan_reg
        from shared.images.validation_split import check_validation

        images = len(scan_dataset(values["train_data_dir"], values["metadata_path"], values["caption_extension"]).items)
        scan_reg(values)  # the regularisation and validation folders are read as the trainer will
        check_validation(values, images)
        return images
    from shared.llm.objective import scan_rows  # no tokenizer needed

    return scan_rows(values["train_data_dir"], values["objective"])


def check_llm_targets(values: Mapping[str, Any], where: Callable[[str], str], roots: Roots | None) -> None:
    """The LLM deploy keys (shared/llm/deploy.py): what they export exports, the folder they copy to is
    one, inside the roots."""
    from shared.errors import UserError
    from shared.llm.deploy import preflight_targets, textgen_candidates

    if roots is not None and values["textgen_dir"] is not None:  # its loras folder may link out of it
        confine_paths(values, {}, roots, extra=[("textgen_dir", p, "write") for p in textgen_candidates(values["textgen_dir"])])
    try:
        preflight_targets(values)
    except UserError as exc:
        key = str(exc).split(":")[0].split(" ")[0]  # each message starts with the key it is about
        raise type(exc)(f"{where(key)}: {exc}") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config, apply `key=value` overrides and run the pre-flight (every check that needs no
    weights: values, files, the model family's rules, the data set). What `train` runs."""
    path = Path(path)
    data = read_config_file(path, overrides)
    return check(data, source=str(path), base_dir=path.resolve().parent, origins=override_origins(overrides)).config
