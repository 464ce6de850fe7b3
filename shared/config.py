"""The training config: `TrainConfig`, generated from the declarations in shared/schema, and reading it.

    cfg = load_config("my.yaml", ["lora_rank=4"])    # shared.preflight: read, override, run the whole pre-flight
    cfg = config_from_dict({...}, base_dir=folder)   # only the declarations' checks (no file touched)
    cfg = TrainConfig.from_canonical(job["config"])  # a config the pre-flight accepted, as stored

Every key, its type, default, rule and help live in shared/schema (one module per section); this module
only turns them into a dataclass, so trainers read `cfg.resolution` and nothing here restates a key.
Relative paths are resolved against the folder of the config file (or the daemon client's stated base
folder), never the process's cwd.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from shared import schema
from shared.errors import ConfigError
from shared.schema.output import derived_name


def _annotation(setting: schema.Setting) -> Any:
    kind = {list: list[str], dict: dict[str, Any]}.get(setting.type, setting.type)
    if setting.type is list and setting.items is not str:
        kind = list[setting.items] | str
    if setting.choices is not None:
        kind = Literal[setting.choices]
    return kind | None if setting.optional or setting.required else kind


class _TrainConfigMethods:
    def to_dict(self) -> dict[str, Any]:
        """A JSON-able snapshot (paths as strings) for logs, metadata and the daemon's job record."""
        return schema.canonical({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    @property
    def resolved_output_name(self) -> str:
        return derived_name(self.output_dir, self.output_name)

    @classmethod
    def from_canonical(cls, data: dict[str, Any]):
        """A config the pre-flight accepted (its canonical dict, as a job stores it), without checking it
        again: the daemon's worker and every rank of a multi-process run rebuild it this way."""
        values = {}
        for name, setting in schema.TRAIN.items():
            value = data.get(name, setting.default)
            values[name] = Path(value) if setting.type is Path and value is not None else value
        return cls(**values)


TrainConfig = dataclasses.make_dataclass(
    "TrainConfig",
    [(s.name, _annotation(s), dataclasses.field(default=s.default, metadata={"help": s.help, "setting": s}))
     for s in schema.TRAIN.values()],
    bases=(_TrainConfigMethods,),
    namespace={"__module__": __name__, "__doc__": "One training job's settings (see shared/schema)."},
)

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


# ---------------------------------------------------------------------------------------------
# Reading


def read_config_file(path: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """The raw `key: value` mapping of a YAML config with `key=value` overrides applied (each override
    already checked against its setting): what `submit` sends to the daemon, which checks the rest."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of `key: value` lines, got {type(data).__name__}")
    data = dict(data)
    data.update(parse_overrides(overrides or []))
    return data


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` items (YAML values) as a mapping; a wrong one is named as `--set key=value`."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value")
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            parsed = value
        schema.coerce_config({key: parsed}, source=f"--set {item}", kind="train", only_given=True)
        out[key] = parsed
    return out


def override_origins(items: list[str] | None) -> dict[str, str]:
    """Which keys came from `--set`, for the messages: {key: "--set key=value"} (the last one wins)."""
    return {item.partition("=")[0].strip(): f"--set {item}" for item in items or []}


def config_from_dict(data: dict[str, Any], *, source: str = "config", base_dir: Path | None = None,
                     origins: dict[str, str] | None = None) -> TrainConfig:
    """A TrainConfig from a mapping of keys, checked against the declarations only (types, rules,
    cross-field rules; no file is touched). shared.preflight.check runs the whole pre-flight."""
    from shared.presets import apply_preset, preset_origins

    origins = preset_origins(data, source, origins)
    values = schema.coerce_config(apply_preset(data, source), source=source,
                                  base_dir=Path(base_dir) if base_dir else None, origins=origins)
    return TrainConfig(**values)


def detect_task(cfg: TrainConfig) -> str:
    """sd or llm: the config's `task`, or (for `auto`) what `base_model` is, read from its header."""
    if cfg.task != "auto":
        return cfg.task
    from shared.model_family import model_family

    return model_family(Path(cfg.base_model), cfg.model_config).task
