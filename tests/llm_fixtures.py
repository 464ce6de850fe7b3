"""Fixtures for the LLM tests (a pytest plugin named in conftest.py): tiny causal LMs saved in real
Transformers folders, and configs for them."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.fixtures.tiny_llm import INSTRUCTION_PAIRS, write_instruction_data

# Fewer pairs than the fixture has: memorised in ~150 steps, a few seconds on a busy 2-core box.
PAIRS = INSTRUCTION_PAIRS[:8]


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from shared.fixtures.tiny_llm import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_glm(tmp_path_factory) -> Path:
    from shared.fixtures.tiny_llm import build_tiny_glm

    return build_tiny_glm(tmp_path_factory.mktemp("tiny_glm") / "tiny-glm")


@pytest.fixture(scope="session")
def llm_tokenizer(tiny_llama):
    from shared.llm.model import load_tokenizer

    return load_tokenizer(tiny_llama, trust_remote_code=False)


@pytest.fixture
def chat_data(tmp_path) -> Path:
    return write_instruction_data(tmp_path / "data" / "chat.jsonl", "chat", PAIRS)


def llm_values(base_model: Path, data: Path, out: Path, **overrides) -> dict:
    values = dict(
        base_model=base_model,
        train_data_dir=data,
        output_dir=out,
        max_train_steps=150,
        learning_rate=1e-2,
        batch_size=4,
        lora_dropout=0.0,
        max_seq_len=64,
        save_steps=0,
        seed=0,
        device="cpu",
        sample_prompts=[q for q, _ in PAIRS],
        sample_max_tokens=24,
        evaluation=False,  # the tests of evaluation turn it on
    )
    values.update(overrides)
    return values


def llm_config(base_model: Path, data: Path, out: Path, **overrides):
    from shared.config import config_from_dict

    values = {k: str(v) if isinstance(v, Path) else v for k, v in llm_values(base_model, data, out, **overrides).items()}
    return config_from_dict(values, source="test")


def write_config(path: Path, **values) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in values.items()}))
    return path


def chat_prompt_ids(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


def answers(model, tokenizer, pairs=PAIRS, max_new_tokens: int = 24):
    """Greedy answers to each question, as Generation objects."""
    from shared.llm.generate import greedy

    return [greedy(model, tokenizer, chat_prompt_ids(tokenizer, q), max_new_tokens) for q, _ in pairs]
