"""The bundled demo, run the way the extensions run jobs: through the trainer daemon.

It builds two tiny models from fixed seeds (an SD1.5-architecture checkpoint saved as a real single
file, and a LLaMA-architecture causal LM saved with `save_pretrained`), starts a daemon with its own
state folder inside the demo folder, submits an SD LoRA job and an LLM adapter job, shows their
progress, deploys the SD file into a demo Lora folder, and prints the LLM's answers before and after
and the files for llama.cpp and Ollama the LLM job wrote beside its adapter (the adapter as GGUF, the
tiny base as GGUF and a Modelfile), with the commands that use them (and, where llama-cpp-python is
installed, llama.cpp's own answer from those files). Nothing is downloaded. It lives with the daemon (it drives one); the data it trains on is shipped in
shared/demo/images.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from importlib import resources
from pathlib import Path

import yaml

from daemon.remote import follow_job

DEMO_IMAGES = resources.files("shared") / "demo" / "images"
DEMO_QUESTIONS = 8  # instruction pairs the LLM demo learns


def demo_config(workdir: Path) -> Path:
    """Write (or reuse) the SD demo model and return the path of a ready-to-run YAML config."""
    from shared.fixtures.tiny_sd import build_tiny_sd15

    workdir = Path(workdir).resolve()
    models = workdir / "models"
    checkpoint = models / "tiny-sd15.safetensors"
    if not checkpoint.is_file():
        print(f"Building the tiny SD demo model in {models} ...", flush=True)
        build_tiny_sd15(models)
    config = {
        "base_model": str(checkpoint),
        "model_config": str(models / "tiny-sd15-config"),
        "train_data_dir": str(DEMO_IMAGES),
        "output_dir": str(workdir / "output" / "demo_shapes"),
        "deploy_dir": str(workdir / "Lora"),
        "resolution": 64,
        "lora_rank": 8,
        "lora_alpha": 16,
        "learning_rate": 1e-3,
        "batch_size": 2,
        "max_train_steps": 60,
        "save_steps": 20,
        "seed": 1,
    }
    path = workdir / "demo.yaml"
    workdir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def llm_demo_config(workdir: Path) -> Path:
    """Write (or reuse) the tiny LLaMA and its instruction data; return the LLM job's YAML config."""
    from shared.fixtures.tiny_llm import INSTRUCTION_PAIRS, build_tiny_llama, write_instruction_data

    workdir = Path(workdir).resolve()
    model = workdir / "models" / "tiny-llama"
    if not (model / "config.json").is_file():
        print(f"Building the tiny LLaMA demo model in {model} ...", flush=True)
        build_tiny_llama(model)
    data = write_instruction_data(workdir / "data" / "tone.jsonl", "alpaca_jsonl", INSTRUCTION_PAIRS[:DEMO_QUESTIONS])
    config = {
        "base_model": str(model),
        "train_data_dir": str(data),
        "output_dir": str(workdir / "output" / "demo_tone"),
        "output_name": "demo_tone",
        "learning_rate": 1e-2,
        "batch_size": 4,
        "lora_dropout": 0.0,
        "max_seq_len": 64,
        "max_train_steps": 150,
        "save_steps": 0,
        "seed": 0,
        "gguf_base": True,  # the llama.cpp/Ollama files: the adapter and the (tiny) base as GGUF, a Modelfile
    }
    path = workdir / "demo_llm.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def llm_answers(model_dir: Path, adapter: Path | None, questions: list[str]) -> list[str]:
    """Greedy answers of the base model (or base + adapter) to each question, as the chat template asks."""
    from shared.llm.generate import greedy
    from shared.llm.model import load_causal_lm, load_tokenizer

    model = load_causal_lm(model_dir)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=False)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    out = []
    for question in questions:
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
        out.append(greedy(model, tokenizer, tokenizer(text, add_special_tokens=False).input_ids, 24).text.strip())
    return out


def _submit_and_follow(client, config_path: Path) -> dict:

    data = yaml.safe_load(config_path.read_text())
    job = client.submit(data, base_dir=config_path.parent, source=str(config_path))
    print(f"\nSubmitted job {job['id']} ({job['name']}) to the daemon", flush=True)
    if follow_job(client, job["id"]) != 0:
        raise SystemExit(f"the demo job failed; its log: python -m daemon logs {job['id']}")
    return client.get(job["id"])["result"]


def run_demo(workdir: Path) -> None:
    from shared.client import DaemonClient
    from shared.fixtures.tiny_llm import INSTRUCTION_PAIRS
    from shared.launcher import daemon_answers, ensure_daemon, log_path

    workdir = Path(workdir).resolve()
    sd_config, llm_config = demo_config(workdir), llm_demo_config(workdir)
    state = workdir / "daemon-state"
    already = daemon_answers(state) is not None
    roots = ["--allow-read", str(workdir), "--allow-read", str(DEMO_IMAGES), "--allow-write", str(workdir)]
    ensure_daemon(state, python=sys.executable, extra_args=["--port", "0", *roots])
    print(f"Trainer daemon running (state {state}, log {log_path(state)})", flush=True)
    try:
        with DaemonClient.connect(state) as client:
            sd = _submit_and_follow(client, sd_config)
            llm = _submit_and_follow(client, llm_config)
    finally:
        if not already:
            pid = json.loads((state / "daemon.json").read_text())["pid"]
            os.kill(pid, signal.SIGTERM)

    questions = [q for q, _ in INSTRUCTION_PAIRS[:3]]
    model_dir = Path(yaml.safe_load(llm_config.read_text())["base_model"])
    before = llm_answers(model_dir, None, questions)
    after = llm_answers(model_dir, Path(llm["lora"]), questions)
    print("\nThe LLM's answers before and after training:")
    for question, old, new in zip(questions, before, after):
        print(f"  Q: {question}\n     before: {old[:70]!r}\n     after:  {new[:70]!r}")
    print(f"\nSD LoRA: {sd['lora']}")
    print(f"Deployed into the demo Lora folder: {', '.join(sd['deployed'])} (use it as <lora:{sd['lora_name']}:0.8>)")
    print(f"LLM adapter: {llm['lora']}")
    show_llama_cpp_files(Path(llm["lora"]), questions[0])


def show_llama_cpp_files(adapter: Path, question: str) -> None:
    """The llama.cpp/Ollama files the LLM job wrote into its adapter folder, and how to use them."""
    adapter_gguf = next(adapter.glob("*-lora.gguf"))
    base_gguf = next(p for p in adapter.glob("*.gguf") if p != adapter_gguf)
    print("\nFor llama.cpp and Ollama, in the adapter folder:")
    print(f"  {adapter_gguf.name}  the adapter as a llama.cpp LoRA adapter")
    print(f"  {base_gguf.name}  the base model as GGUF (f16)")
    print("  Modelfile  FROM that base, ADAPTER the adapter, TEMPLATE and stops from the training chat template")
    print(f"\n  llama-cli -m {base_gguf} --lora {adapter_gguf} -cnv")
    print(f"  cd {adapter} && ollama create {adapter.name} -f Modelfile && ollama run {adapter.name} {question!r}")
    answer = llama_cpp_answer(base_gguf, adapter_gguf, adapter, question)
    if answer is not None:
        print(f"\nllama.cpp itself (llama-cpp-python), from these two files:\n  Q: {question}\n     {answer!r}")


def llama_cpp_answer(base_gguf: Path, adapter_gguf: Path, adapter: Path, question: str) -> str | None:
    """llama.cpp's greedy answer with the adapter, where llama-cpp-python is installed (else None)."""
    try:
        import llama_cpp
    except ImportError:
        return None
    from shared.llm.model import load_tokenizer

    tokenizer = load_tokenizer(adapter, trust_remote_code=False)  # the adapter's: its training chat template
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    with _quiet_stderr():  # llama.cpp logs a line per adapter tensor while it loads, even with verbose=False
        llm = llama_cpp.Llama(model_path=str(base_gguf), lora_path=str(adapter_gguf), n_ctx=256, n_threads=1,
                              seed=0, verbose=False)
    out = []
    prompt = llm.tokenize(text.encode(), add_bos=False, special=True)
    for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        if token == llm.token_eos() or len(out) >= 24:
            break
        out.append(token)
    return llm.detokenize(out).decode("utf-8", "replace")


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 to the null device for a while (native code writes there directly)."""
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)
