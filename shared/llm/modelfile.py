"""An Ollama Modelfile whose prompt format is the one the job trained with.

The most reported Ollama failure after fine-tuning is endless generation: the Modelfile's TEMPLATE
(a Go text/template) renders turns differently from the chat template the adapter was trained on,
so the model never writes the end-of-turn token where Ollama expects it, or Ollama never stops on
the one it writes. So the TEMPLATE here is derived from the training template itself:

1. The training template (the tokenizer's Jinja template or a built-in of shared/llm/data.py) renders
   probe conversations whose contents are unique markers, one message more each time, through the
   tokenizer's own `apply_chat_template` (as training did). Each message adds text = (text before
   its content) + content + (text after it); those pieces are read per (previous role, role), and
   the generation prompt as the text `add_generation_prompt` adds.
2. They become a Go template over Ollama's `.Messages` (`.Role`, `.Content`): a `range` that picks
   the pieces by the previous message's role, then the generation prompt unless the last message is
   the assistant's (Ollama then continues that message, so its end-of-turn text is left off).
3. `PARAMETER stop` gets the end-of-turn text of an assistant turn (e.g. `</s>`, `<|im_end|>`) and
   the marker that opens the next user turn, so generation stops where training taught it to.

Every literal is written as a quoted Go string (`{{ "..." }}`), so Go's `{{-` trimming, which
only touches template text, never eats a newline the training template emits. A template that is
not a plain concatenation of per-message pieces (one that changes an earlier part when a turn is
added, or transforms the content) is refused with one line: no Modelfile is better than a wrong one.

The BOS token: llama.cpp (and so Ollama) adds it itself when the GGUF says
`tokenizer.ggml.add_bos_token`, so with `adds_bos` a leading BOS text is left out of the TEMPLATE;
otherwise it is part of it and parsed as the special token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from shared.errors import ModelError

ROLES = ("system", "user", "assistant")
# Conversations rendered to read the template's pieces (markers replace the contents).
PROBES = (
    ("system", "user", "assistant", "user", "assistant"),
    ("user", "assistant", "user", "assistant"),
)


@dataclass
class TemplatePieces:
    """Text around each message's content, by (previous role or "", role), and the generation prompt."""

    around: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)
    generation: str = ""


def _marker(i: int) -> str:
    # private-use characters no template text contains, around letters a case change would alter
    return f"\ue000q{i}z\ue001"


def _read_probe(roles, texts: list[str], prompts: dict[int, str]):
    """Pieces of one probe conversation: its renderings one message longer each time."""
    found: dict[tuple[str, str], tuple[str, str]] = {}
    done = ""
    for k, (role, text) in enumerate(zip(roles, texts)):
        if not text.startswith(done):
            raise ModelError(
                "chat template: it changes earlier turns when a turn is added, so no Ollama TEMPLATE can "
                "reproduce it; train with a template that renders turn by turn (chat_template: chatml)"
            )
        before, sep, after = text[len(done):].partition(_marker(k))
        if not sep or _marker(k) in after:
            raise ModelError(
                "chat template: it does not emit each message's content unchanged in its own turn, so no "
                "Ollama TEMPLATE can reproduce it; use chat_template: chatml or alpaca"
            )
        key = (roles[k - 1] if k else "", role)
        if found.setdefault(key, (before, after)) != (before, after):
            raise ModelError(
                f"chat template: a {role} message after {key[0] or 'nothing'} renders differently within one "
                "conversation (it depends on more than the previous role); no Ollama TEMPLATE can reproduce it"
            )
        done = text
    generations = set()
    for k, prompt in prompts.items():
        if not prompt.startswith(texts[k]):
            raise ModelError("chat template: add_generation_prompt changes the conversation before it")
        generations.add(prompt[len(texts[k]):])
    return found, generations


def template_pieces(tokenizer, template: str) -> TemplatePieces:
    """Read the per-message pieces of `template` by rendering probe conversations with `tokenizer`."""

    def render(messages, generation: bool) -> str:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=generation
        )

    pieces = TemplatePieces()
    generations: set[str] = set()
    rendered_any = False
    failure: ModelError | None = None
    for roles in PROBES:
        messages = [{"role": r, "content": _marker(i)} for i, r in enumerate(roles)]
        try:
            texts = [render(messages[: k + 1], False) for k in range(len(messages))]
            prompts = {k: render(messages[: k + 1], True) for k, r in enumerate(roles) if r == "user"}
        except Exception:  # a template may refuse a probe (e.g. no system role); the other probe may do
            continue
        try:
            found, generation = _read_probe(roles, texts, prompts)
        except ModelError as exc:  # e.g. a system message folded into the first user turn
            failure = exc
            continue
        for key, value in found.items():
            if pieces.around.setdefault(key, value) != value:
                raise ModelError(
                    f"chat template: a {key[1]} message after {key[0] or 'nothing'} renders differently in "
                    "different conversations; no Ollama TEMPLATE can reproduce it"
                )
        generations |= generation
        rendered_any = True
    if failure is not None and not any(k == ("assistant", "user") for k in pieces.around):
        raise failure
    if not rendered_any or not any(r == "user" for _, r in pieces.around):
        raise ModelError("chat template: it renders none of the probe conversations (user/assistant turns)")
    if len(generations) != 1:
        raise ModelError("chat template: its generation prompt depends on the conversation; no Ollama TEMPLATE fits")
    pieces.generation = generations.pop()
    return pieces


def go_string(text: str) -> str:
    """`text` as a Go interpreted string literal (quotes written as \\u0022, so no `\"\"\"` can
    appear inside the Modelfile's triple-quoted TEMPLATE)."""
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append("\\u0022")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _lit(text: str) -> str:
    return "{{ " + go_string(text) + " }}" if text else ""


def go_template(pieces: TemplatePieces, *, bos_text: str | None = None) -> str:
    """The Go text/template for Ollama. `bos_text`: a leading BOS text to leave out (llama.cpp adds
    the BOS token itself)."""
    around = dict(pieces.around)
    if bos_text:
        for key, (before, after) in list(around.items()):
            if key[0] == "" and before.startswith(bos_text):
                around[key] = (before[len(bos_text):], after)

    def body(role: str, before: str, after: str) -> str:
        closing = _lit(after)
        if role == "assistant" and closing:
            closing = "{{ if not $last }}" + closing + "{{ end }}"
        return _lit(before) + "{{ .Content }}" + closing

    order = sorted(around, key=lambda k: (ROLES.index(k[1]), k[0]))
    branches = []
    for prev, role in order:
        cond = f'and (eq $prev "{prev}") (eq .Role "{role}")'
        branches.append((cond, body(role, *around[(prev, role)])))
    for role in ROLES:  # a role after a role no probe showed: its most usual rendering
        seen = [k for k in order if k[1] == role]
        if seen:
            usual = next((k for k in seen if k[0] != ""), seen[0])
            branches.append((f'eq .Role "{role}"', body(role, *around[usual])))
    lines = ['{{- $prev := "" }}', "{{- range $i, $_ := .Messages }}", "{{- $last := eq (len (slice $.Messages $i)) 1 }}"]
    for n, (cond, text) in enumerate(branches):
        lines.append(("{{- if " if n == 0 else "{{- else if ") + cond + " }}" + text)
    lines += ["{{- end }}", "{{- $prev = .Role }}", "{{- end }}"]
    if pieces.generation:
        lines.append('{{- if ne $prev "assistant" }}' + _lit(pieces.generation) + "{{ end }}")
    return "\n".join(lines)


def stop_strings(pieces: TemplatePieces, eos_text: str | None = None) -> list[str]:
    """Stop texts: the end of an assistant turn, the marker opening the next user turn, the EOS text."""
    stops: list[str] = []

    def add(text: str | None) -> None:
        text = (text or "").strip()
        if text and text not in stops and '"' not in text:
            stops.append(text)

    for (_, role), (_, after) in sorted(pieces.around.items()):
        if role == "assistant":
            add(after)
    for (prev, role), (before, _) in sorted(pieces.around.items()):
        if role == "user" and prev == "assistant":
            add(before.strip().splitlines()[0] if before.strip() else "")
    add(eos_text)
    return stops


def modelfile_text(base: str, adapter: str, template: str, stops: list[str], *, comment: str = "") -> str:
    """A Modelfile: FROM `base` (an Ollama model name or a GGUF path), ADAPTER `adapter` (a GGUF LoRA,
    relative to the Modelfile's folder), TEMPLATE and one PARAMETER stop per stop text."""
    if '"""' in template:
        raise ModelError('Modelfile: the TEMPLATE would contain """, which ends it early')
    lines = [f"# {line}" for line in comment.splitlines()] if comment else []
    lines += [f"FROM {base}", f"ADAPTER {adapter}", f'TEMPLATE """{template}"""']
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in stops]
    return "\n".join(lines) + "\n"


def write_modelfile(
    folder: Path,
    *,
    base: str,
    adapter: str,
    tokenizer,
    chat_template: str,
    name: str = "",
) -> Path:
    """Write `folder/Modelfile` for the adapter GGUF `adapter` (a file name in `folder`) on `base`.
    `chat_template` is the Jinja template the job trained with; `tokenizer` renders it."""
    from shared.files import atomic_write

    pieces = template_pieces(tokenizer, chat_template)
    adds_bos = tokenizer.bos_token_id is not None and tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]
    template = go_template(pieces, bos_text=tokenizer.bos_token if adds_bos else None)
    stops = stop_strings(pieces, tokenizer.eos_token)
    comment = f"Written by lora-daemon{f' for {name}' if name else ''}. Use: ollama create {name or 'my-model'} -f Modelfile"
    text = modelfile_text(base, adapter, template, stops, comment=comment)
    target = Path(folder) / "Modelfile"
    return atomic_write(target, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
