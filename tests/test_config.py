from pathlib import Path

import pytest

from shared.config import TrainConfig, config_from_dict, detect_task
from shared.errors import ConfigError
from shared.preflight import load_config


def test_seed_defaults_and_output_name(sd_config):
    cfg = load_config(sd_config())
    fresh = TrainConfig()
    assert (fresh.learning_rate, fresh.lora_rank, fresh.lora_alpha, fresh.lora_dropout) == (2e-4, 8, 16.0, 0.1)
    assert fresh.lr_scheduler == "cosine"
    assert cfg.resolved_output_name == "my_lora"  # last part of output_dir


def test_yaml_1_1_exponent_string_is_a_number(sd_config, tmp_path):
    path = sd_config()
    path.write_text(path.read_text().replace("learning_rate: 0.001", "learning_rate: 2e-4"))
    assert load_config(path).learning_rate == pytest.approx(2e-4)


def test_relative_paths_resolve_against_the_config_file(tmp_path, image_dir, tiny_sd):
    folder = image_dir.parent
    cfg = config_from_dict(
        {"base_model": str(tiny_sd["safetensors"]), "train_data_dir": "images", "output_dir": "out/x"},
        base_dir=folder,
    )
    assert cfg.train_data_dir == folder / "images"
    assert cfg.output_dir == folder / "out" / "x"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"learning_rat": 1e-4}, "unknown key 'learning_rat' (did you mean 'learning_rate'?)"),
        ({"learning_rate": "fast"}, "learning_rate: expected a number, got 'fast'"),
        ({"lora_rank": 4.5}, "lora_rank: expected a whole number"),
        ({"lora_init": "xavier"}, "lora_init: 'xavier' is not one of default, gaussian"),
        ({"train_data_dir": "/nonexistent/dir"}, "train_data_dir: /nonexistent/dir does not exist"),
        ({"lora_rank": 0}, "lora_rank must be at least 1"),
        ({"output_name": "../../x"}, "output_name '../../x' must be"),
        ({"gradient_checkpointing": "maybe"}, "gradient_checkpointing: expected true or false"),
    ],
)
def test_bad_values_name_key_and_file(sd_config, change, message):
    path = sd_config(**change)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_required_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train_data_dir: .\noutput_dir: out\n")
    with pytest.raises(ConfigError, match="missing required key 'base_model'"):
        load_config(path)


def test_set_overrides(sd_config):
    cfg = load_config(sd_config(), ["lora_rank=4", "learning_rate=3e-4", "output_name=other"])
    assert (cfg.lora_rank, cfg.learning_rate, cfg.resolved_output_name) == (4, 3e-4, "other")
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(sd_config(), ["lora_rank"])


def test_not_yaml_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(path)


def test_task_detection(tiny_sd, tmp_path, sd_config):
    cfg = load_config(sd_config())
    assert cfg.task == detect_task(cfg) == "sd"  # the pre-flight wrote what it found into the config
    llm = tmp_path / "llm"
    llm.mkdir()
    (llm / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    cfg = config_from_dict({"base_model": str(llm), "train_data_dir": str(tmp_path), "output_dir": "out"})
    assert cfg.task == "auto" and detect_task(cfg) == "llm"
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ConfigError, match="not a checkpoint"):
        detect_task(load_config(sd_config(base_model=text)))
    assert detect_task(load_config(sd_config(base_model=text, task="sd"))) == "sd"


def test_to_dict_is_json_able(sd_config):
    import json

    data = load_config(sd_config()).to_dict()
    assert json.loads(json.dumps(data))["lora_rank"] == 8
    assert isinstance(data["base_model"], str) and Path(data["base_model"]).is_file()


@pytest.mark.parametrize("key, value, rule", [
    ("learning_rate", 0, "learning_rate must be greater than 0 and at most 10, got 0"),
    # below 1 is AdamW's (a rule beside learning_rate: the range follows the optimizer)
    ("learning_rate", 1.0, "learning_rate must be less than 1 for optimizer adamw, got 1 (a multiplier such as 1.0 "
                           "is what optimizer: prodigy takes)"),
    ("lora_dropout", 1, "lora_dropout must be at least 0 and less than 1, got 1"),
    ("lora_rank", 5000, "lora_rank must be at least 1 and at most 4096, got 5000"),
    ("lora_alpha", 0, "lora_alpha must be greater than 0 and at most 65,536, got 0"),
    ("resolution", 516, "resolution must be a multiple of 8, got 516"),
    ("seed", -1, "seed must be at least 0 and at most 4,294,967,295, got -1"),
])
def test_every_range_message_states_the_declared_rule(sd_config, key, value, rule):
    path = sd_config(**{key: value})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: {rule}"


def test_a_wrong_set_value_is_named_as_set(sd_config):
    path = sd_config()
    with pytest.raises(ConfigError) as err:
        load_config(path, ["lora_rank=0"])
    assert str(err.value) == "--set lora_rank=0: lora_rank must be at least 1 and at most 4096, got 0"
    with pytest.raises(ConfigError, match=r"^--set lerning_rate=1: unknown key 'lerning_rate' \(did you mean"):
        load_config(path, ["lerning_rate=1"])
    # a rule across keys names the --set that broke it, and a value from the file is still the file's
    with pytest.raises(ConfigError, match=r"^--set shuffle_caption=true: cache_text_encoder_outputs needs"):
        load_config(sd_config(cache_text_encoder_outputs=True), ["shuffle_caption=true"])
    with pytest.raises(ConfigError, match=rf"^{path}: lora_rank must be at least 1"):
        load_config(sd_config(lora_rank=0), ["seed=3"])


@pytest.mark.parametrize("output_dir, name", [("out/..", ".."), ("out/.hidden", ".hidden"), ("out/a b", "a b"),
                                              ("out/x<y", "x<y")])
def test_the_name_rule_applies_to_a_name_derived_from_output_dir(tmp_path, tiny_sd, image_dir, output_dir, name):
    data = {"base_model": str(tiny_sd["safetensors"]), "train_data_dir": str(image_dir), "output_dir": output_dir}
    with pytest.raises(ConfigError) as err:
        config_from_dict(data, source="c.yaml", base_dir=tmp_path)
    assert str(err.value).startswith(f"c.yaml: output_dir: the LoRA is named after the last part of output_dir "
                                     f"({name!r}), which must be 1-100 ASCII letters")
    ok = config_from_dict({**data, "output_name": "fine"}, source="c.yaml", base_dir=tmp_path)
    assert ok.resolved_output_name == "fine"
