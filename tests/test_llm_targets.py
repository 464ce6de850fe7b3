"""An LLM job's deploy keys through the loop and the pre-flight: the llama.cpp/Ollama files appear in
the published adapter folder (and in every copy of it), text-generation-webui gets a new folder beside
the user's, vLLM's check is logged, and what would make a file impossible is refused before training
(at the pre-flight where the config shows it, else before the weights load)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from shared.errors import ConfigError, ModelError, UserError
from shared.preflight import PathNotAllowed, check, load_config
from shared.roots import Roots
from shared.train import run_training
from tests.llm_fixtures import PAIRS, llm_config, llm_values
from tests.test_llm_training import Recorder


def gguf_fields(path: Path) -> dict:
    import gguf

    return {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items() if not k.startswith("GGUF.")}


def short(base, data, out, **overrides):
    return llm_config(base, data, out, **{"max_train_steps": 3, "sample_prompts": [PAIRS[0][0]],
                                          "sample_max_tokens": 2, **overrides})


def test_the_llama_cpp_and_ollama_files_are_published_with_the_adapter(tiny_llama, chat_data, tmp_path):
    webui = tmp_path / "text-generation-webui"
    theirs = webui / "user_data" / "loras" / "facts"
    theirs.mkdir(parents=True)
    (theirs / "adapter_config.json").write_text('{"mine": true}')
    rec = Recorder()
    result = run_training(short(tiny_llama, chat_data, tmp_path / "out" / "facts", gguf_base=True, merge_output=True,
                                textgen_dir=webui, deploy_dir=tmp_path / "adapters"), rec)
    folder = result.output_path
    files = {p.name for p in folder.iterdir()}
    assert {"adapter_model.safetensors", "facts-lora.gguf", "tiny-llama-f16.gguf", "Modelfile"} <= files
    adapter = gguf_fields(folder / "facts-lora.gguf")
    assert (adapter["general.type"], adapter["adapter.type"], adapter["adapter.lora.alpha"]) == ("adapter", "lora", 16.0)
    assert adapter["general.name"] == "facts"  # not the temporary folder's name it was written in
    assert gguf_fields(folder / "tiny-llama-f16.gguf")["general.type"] == "model"
    modelfile = (folder / "Modelfile").read_text()
    assert re.search(r"^FROM \./tiny-llama-f16\.gguf$", modelfile, re.M)
    assert re.search(r"^ADAPTER \./facts-lora\.gguf$", modelfile, re.M) and 'PARAMETER stop "</s>"' in modelfile

    # every copy of the adapter folder is whole: deploy_dir's too
    deployed = result.deployed_path
    assert {p.name for p in deployed.iterdir()} == files
    assert (deployed / "facts-lora.gguf").read_bytes() == (folder / "facts-lora.gguf").read_bytes()
    # text-generation-webui: a new folder beside the user's, PEFT files only
    copy = webui / "user_data" / "loras" / "facts_2"
    assert (copy / "adapter_model.safetensors").read_bytes() == (folder / "adapter_model.safetensors").read_bytes()
    assert not list(copy.glob("*.gguf")) and not (copy / "Modelfile").exists()
    assert (theirs / "adapter_config.json").read_text() == '{"mine": true}'
    # the merged model as GGUF too, beside the merged folder
    merged_gguf = tmp_path / "out" / "facts" / "facts-merged-f16.gguf"
    assert gguf_fields(merged_gguf)["general.type"] == "model"

    [finished] = [d for k, d in rec.events if k == "finished"]
    assert finished["outputs"] == {
        "lora": str(folder), "deployed": str(deployed), "merged": str(tmp_path / "out" / "facts" / "facts-merged"),
        "gguf_adapter": str(folder / "facts-lora.gguf"), "gguf_base": str(folder / "tiny-llama-f16.gguf"),
        "modelfile": str(folder / "Modelfile"), "merged_gguf": str(merged_gguf), "textgen": str(copy),
        "report": str(tmp_path / "out" / "facts" / "report.html")}
    log = "\n".join(rec.lines)
    assert f"llama.cpp: llama-cli -m {folder / 'tiny-llama-f16.gguf'} --lora {folder / 'facts-lora.gguf'}" in log
    assert f"vLLM: vllm serve {tiny_llama} --enable-lora --lora-modules facts={folder}" in log
    for parent in (folder.parent, deployed.parent, copy.parent):
        assert not [p for p in parent.iterdir() if p.name.startswith(".")]  # no temporaries left


@pytest.mark.parametrize(("keys", "files", "from_line"), [
    (dict(gguf_adapter=True), {"facts-lora.gguf"}, None),
    (dict(ollama_base="hf.co/someone/tiny-llama-GGUF:F16"), {"facts-lora.gguf", "Modelfile"},
     "FROM hf.co/someone/tiny-llama-GGUF:F16"),
])
def test_each_key_writes_what_it_names(tiny_llama, chat_data, tmp_path, keys, files, from_line):
    rec = Recorder()
    result = run_training(short(tiny_llama, chat_data, tmp_path / "out" / "facts", max_train_steps=1, **keys), rec)
    assert {p.name for p in result.output_path.iterdir() if p.suffix == ".gguf" or p.name == "Modelfile"} == files
    if from_line:
        assert f"{from_line}\n" in (result.output_path / "Modelfile").read_text()
    # the checkpoints stay plain PEFT folders: the files are for the finished adapter
    assert not list((tmp_path / "out" / "facts" / "checkpoints").glob("*/*.gguf"))
    assert any(line.startswith("llama.cpp: llama-cli -m <the base model as GGUF> --lora ") for line in rec.lines)


def upper_case_template_model(tiny_llama, folder: Path) -> Path:
    """The tiny LLaMA with a chat template that changes the message text (upper-cases it): training
    renders it, but no Ollama TEMPLATE can (Go's text/template gets the message as it is)."""
    shutil.copytree(tiny_llama, folder)
    template = (folder / "chat_template.jinja").read_text()
    assert "{{ message['content'] }}" in template
    (folder / "chat_template.jinja").write_text(template.replace("{{ message['content'] }}",
                                                                 "{{ message['content'] | upper }}"))
    return folder


def test_what_the_files_could_not_hold_is_refused_before_the_weights_load(tiny_llama, chat_data, tmp_path):
    completion = tmp_path / "completion.jsonl"
    completion.write_text("".join(json.dumps({"prompt": q, "completion": a}) + "\n" for q, a in PAIRS))
    upper = upper_case_template_model(tiny_llama, tmp_path / "upper-llama")
    cases = [
        (dict(base_model=tiny_llama, data=completion, ollama_base="llama3.2:1b"), ConfigError,
         "ollama_base: the Modelfile's TEMPLATE comes from the chat template the job trains with, and this job's "
         "rows (prompt/completion or text) train without one"),
        (dict(base_model=upper, data=chat_data, gguf_base=True), ModelError,
         "chat template: it does not emit each message's content unchanged in its own turn"),
    ]
    for case, error, message in cases:
        out = tmp_path / "out"
        rec = Recorder()
        with pytest.raises(error, match=re.escape(message)):
            run_training(short(case.pop("base_model"), case.pop("data"), out, **case), rec)
        assert not any(line.startswith("Loaded base model") for line in rec.lines)  # before the weights
        assert not out.exists()
    # the same template trains without the Ollama files (llama.cpp's adapter needs no template)
    result = run_training(short(upper, chat_data, tmp_path / "plain", max_train_steps=1, gguf_adapter=True))
    assert (result.output_path / "plain-lora.gguf").is_file()


# --- the pre-flight -----------------------------------------------------------------------------------

def job_file(tmp_path, **values) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in values.items()}))
    return path


def flux_gguf(path: Path) -> Path:
    """A GGUF as ComfyUI-GGUF's converter writes an image model: general.architecture flux."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "flux")
    writer.add_tensor("double_blocks.0.img_attn.qkv.weight", np.zeros((4, 4), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_base_model_is_refused_first_with_one_line(tiny_llama, chat_data, tmp_path):
    from shared.llm.gguf_export import write_model_gguf

    llm = write_model_gguf(tiny_llama, tmp_path / "Tiny-Q4_K_M.gguf")
    with pytest.raises(ModelError) as err:
        load_config(job_file(tmp_path, **llm_values(llm, chat_data, tmp_path / "out")))
    assert str(err.value).startswith(f"base_model: {llm} is a GGUF file (this one says it is tiny-llama), the "
                                     "llama.cpp/Ollama inference format; LoRA training needs the model's Transformers "
                                     "weights: download its original repository")
    image = flux_gguf(tmp_path / "flux1-dev-Q8_0.gguf")
    with pytest.raises(ModelError) as err:  # an SD job's keys: the refusal comes before the family is known
        load_config(job_file(tmp_path, base_model=image, train_data_dir=chat_data, output_dir=tmp_path / "out"))
    assert str(err.value).startswith(f"base_model: {image} is a GGUF file of a flux image model")
    assert "the original weights: set base_model to the model's .safetensors checkpoint" in str(err.value)
    for e in (err.value,):
        assert "\n" not in str(e)
    with pytest.raises(ModelError, match="is a GGUF file"):  # a job that names its task goes to the LLM loader
        run_training(llm_config(llm, chat_data, tmp_path / "out", task="llm"))
    assert not (tmp_path / "out").exists()


def test_the_deploy_keys_are_checked_by_the_preflight(tiny_llama, tiny_glm, chat_data, tmp_path):
    base = llm_values(tiny_llama, chat_data, tmp_path / "out")
    not_webui = tmp_path / "just-a-folder"
    not_webui.mkdir()
    spm_like = tmp_path / "spm-like"  # a SentencePiece-style tokenizer: the adapter exports, the base does not
    shutil.copytree(tiny_llama, spm_like)
    tokenizer = json.loads((spm_like / "tokenizer.json").read_text())
    tokenizer["model"]["byte_fallback"] = True
    (spm_like / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert load_config(job_file(tmp_path, **dict(base, base_model=spm_like, gguf_adapter=True))).gguf_adapter
    cases = [
        (dict(base, base_model=spm_like, gguf_base=True),
         f"job.yaml: base_model {spm_like}: its tokenizer: only byte-level BPE tokenizers"),
        (dict(base, base_model=tiny_glm, trust_remote_code=True, gguf_adapter=True),
         f"job.yaml: base_model {tiny_glm}: GGUF export supports LlamaForCausalLM, MistralForCausalLM, "
         "Qwen2ForCausalLM; this model is TinyGLMForCausalLM"),
        (dict(base, textgen_dir=not_webui), f"job.yaml: textgen_dir: {not_webui} is neither a text-generation-webui "
                                            "folder"),
        (dict(base, textgen_dir=tmp_path / "missing"), f"textgen_dir: {tmp_path / 'missing'} does not exist"),
        (dict(base, use_dora=True, ollama_base="llama3.2:1b"), "use_dora: llama.cpp LoRA adapters have no DoRA "
                                                               "magnitude vectors"),
        (dict(base, ollama_base="llama3.2:1b\nSYSTEM evil"), "ollama_base 'llama3.2:1b\\nSYSTEM evil' must be an "
                                                             "Ollama model name or a GGUF path, without spaces"),
    ]
    for values, message in cases:
        with pytest.raises(UserError) as err:
            load_config(job_file(tmp_path, **values))
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert not (tmp_path / "out").exists()


def test_the_textgen_copy_stays_inside_the_write_roots(tiny_llama, chat_data, tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (outside / "loras").mkdir(parents=True)
    webui = allowed / "text-generation-webui"
    (webui / "user_data").mkdir(parents=True)
    (webui / "user_data" / "loras").symlink_to(outside / "loras")  # its loras folder lies elsewhere
    roots = Roots(read=[tiny_llama, chat_data.parent], write=[allowed])
    job = {k: str(v) if isinstance(v, Path) else v
           for k, v in llm_values(tiny_llama, chat_data, allowed / "out", textgen_dir=webui).items()}
    with pytest.raises(PathNotAllowed) as err:
        check(job, source="job.yaml", roots=roots)
    assert err.value.key == "textgen_dir" and "is outside the folders this daemon may write" in str(err.value)
    (webui / "user_data" / "loras").unlink()
    (webui / "user_data" / "loras").mkdir()
    assert check(job, source="job.yaml", roots=roots).config.textgen_dir == webui
    with pytest.raises(PathNotAllowed, match="textgen_dir: .* is outside the folders this daemon may write"):
        check({**job, "textgen_dir": str(outside)}, source="job.yaml", roots=roots)
