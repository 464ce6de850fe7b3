"""The GGUF files a job writes (`gguf_base: true`), in llama.cpp itself (llama-cpp-python compiles it
from source): the base model GGUF loads, tokenizes every training prompt to the ids training used,
and with the adapter GGUF greedily writes the answers the trained adapter writes. Runs where
`llama-cpp-python` is installed (`pip install -e .[llamacpp]`)."""

import pytest

from shared.llm.model import load_causal_lm, load_tokenizer
from shared.train import run_training
from tests.llm_fixtures import PAIRS, answers, chat_prompt_ids, llm_config

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e .[llamacpp])")


def llama_cpp_greedy(llm, prompt_ids: list[int], max_new_tokens: int = 24) -> tuple[list[int], bool]:
    llm.reset()
    out: list[int] = []
    for token in llm.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if llm.token_eos() == token:
            return out, True
        out.append(token)
        if len(out) >= max_new_tokens:
            return out, False
    return out, False


@pytest.mark.slow
def test_llama_cpp_loads_the_base_gguf_with_the_adapter_and_gives_the_trained_answers(tiny_llama, chat_data, tmp_path):
    from peft import PeftModel

    result = run_training(llm_config(tiny_llama, chat_data, tmp_path / "out" / "facts", val_split=0.0, gguf_base=True))
    tokenizer = load_tokenizer(tiny_llama, trust_remote_code=False)
    trained = answers(PeftModel.from_pretrained(load_causal_lm(tiny_llama), str(result.output_path)), tokenizer)
    assert [g.text for g in trained] == [a for _, a in PAIRS]  # what llama.cpp must reproduce

    # the files the job published with the adapter, as a user would take them
    base_gguf, adapter_gguf = result.output_path / "tiny-llama-f16.gguf", result.output_path / "facts-lora.gguf"
    modelfile = (result.output_path / "Modelfile").read_text()
    assert "FROM ./tiny-llama-f16.gguf\n" in modelfile and "ADAPTER ./facts-lora.gguf\n" in modelfile
    kwargs = dict(model_path=str(base_gguf), n_ctx=256, n_threads=1, seed=0, verbose=False)
    plain = llama_cpp.Llama(**kwargs)
    tuned = llama_cpp.Llama(**kwargs, lora_path=str(adapter_gguf))

    for (question, answer), hf in zip(PAIRS, trained):
        ids = chat_prompt_ids(tokenizer, question)
        text = tokenizer.decode(ids)
        # llama.cpp's tokenizer, from the GGUF's vocabulary and merges, gives the ids training used
        assert tuned.tokenize(text.encode(), add_bos=False, special=True) == ids
        got, stopped = llama_cpp_greedy(tuned, ids)
        assert got == hf.token_ids[:-1] and stopped, question  # same tokens, then EOS
        assert tuned.detokenize(got).decode() == answer
        base_answer, _ = llama_cpp_greedy(plain, ids)
        assert plain.detokenize(base_answer).decode(errors="replace") != answer  # the adapter did it

    # the demo's llama.cpp answer, from the same two files and the adapter's chat template
    from daemon.demo import llama_cpp_answer

    assert llama_cpp_answer(base_gguf, adapter_gguf, result.output_path, PAIRS[0][0]) == PAIRS[0][1]
