"""Vocabularies of caption phrases: the built-in categories and a person's own file.

A category is a list of phrases CLIP chooses among (the best styles, the best lighting, ...), a
template that turns a phrase into the sentence CLIP compares with the image, and its place in the
caption. The built-in lists live as text files in `vocabularies/`; `categories.json` gives their order
(style words first), templates and which category always contributes its best phrase.

A user vocabulary is either a `.txt` file (one phrase a line, `# comments`, optional `[category]`
lines; phrases before any such line go to the category `custom`) or a `.json` file
(`{"category": ["phrase", ...]}` or `{"categories": [{"name", "phrases", "template", "always_keep"}]}`).
Phrases for a built-in category join it; new categories are placed right after `subjects`. Phrases
only compete within their category, so a category of one phrase puts it in every caption: give a
category alternatives for CLIP to choose among.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

from shared.errors import UserError

USER_TEMPLATE = "a picture of {}"
DEFAULT_USER_CATEGORY = "custom"


@dataclass(frozen=True)
class Category:
    name: str
    template: str
    phrases: tuple[str, ...]
    always_keep: bool = False

    def prompts(self) -> list[str]:
        return [self.template.format(phrase) for phrase in self.phrases]


@dataclass
class Vocabulary:
    categories: list[Category] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(len(c.phrases) for c in self.categories)

    def prompts(self) -> list[str]:
        """All prompts, category after category: the rows of the text-feature matrix."""
        return [prompt for category in self.categories for prompt in category.prompts()]

    def spans(self) -> list[tuple[Category, int, int]]:
        """(category, start, end) slices into `prompts()`."""
        out, start = [], 0
        for category in self.categories:
            out.append((category, start, start + len(category.phrases)))
            start += len(category.phrases)
        return out


def _clean_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def _unique(phrases) -> tuple[str, ...]:
    return tuple(dict.fromkeys(p.strip() for p in phrases if p.strip()))


def _check_template(template: str, where: str) -> str:
    if not isinstance(template, str) or template.count("{}") != 1:
        raise UserError(f"{where}: template must contain exactly one {{}} where the phrase goes, got {template!r}")
    return template


def builtin_vocabulary() -> Vocabulary:
    folder = resources.files("shared.autolabel") / "vocabularies"
    manifest = json.loads((folder / "categories.json").read_text(encoding="utf-8"))
    categories = []
    for entry in manifest["categories"]:
        phrases = _clean_lines((folder / f"{entry['name']}.txt").read_text(encoding="utf-8"))
        categories.append(
            Category(entry["name"], entry["template"], _unique(phrases), bool(entry.get("always_keep", False)))
        )
    return Vocabulary(categories)


def _read_user_entries(path: Path) -> list[dict]:
    """The file as a list of {name, phrases, template?, always_keep?}."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"--vocab: {path} not found; give a .txt (one phrase a line) or .json file") from None
    except UnicodeDecodeError:
        raise UserError(f"--vocab: {path} is not UTF-8 text; save it as UTF-8") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"--vocab: {path} is not valid JSON ({exc})") from None
        if isinstance(data, dict) and isinstance(data.get("categories"), list):
            entries = data["categories"]
        elif isinstance(data, dict):
            entries = [{"name": name, "phrases": phrases} for name, phrases in data.items()]
        elif isinstance(data, list):
            entries = [{"name": DEFAULT_USER_CATEGORY, "phrases": data}]
        else:
            entries = None
        ok = entries is not None and all(
            isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("phrases"), list)
            and all(isinstance(p, str) for p in e["phrases"])
            for e in entries
        )
        if not ok:
            raise UserError(
                f"--vocab: {path}: expected {{\"category\": [\"phrase\", ...]}} or "
                f"{{\"categories\": [{{\"name\": ..., \"phrases\": [...]}}]}}"
            )
        return entries
    entries: list[dict] = []
    current = {"name": DEFAULT_USER_CATEGORY, "phrases": []}
    for line in _clean_lines(text):
        if line.startswith("[") and line.endswith("]"):
            if current["phrases"]:
                entries.append(current)
            current = {"name": line[1:-1].strip() or DEFAULT_USER_CATEGORY, "phrases": []}
        else:
            current["phrases"].append(line)
    if current["phrases"]:
        entries.append(current)
    return entries


def add_user_vocabulary(base: Vocabulary, path: Path) -> Vocabulary:
    """`base` with the phrases of the file at `path` merged in."""
    path = Path(path)
    entries = _read_user_entries(path)
    if not any(_unique(e["phrases"]) for e in entries):
        raise UserError(f"--vocab: {path} has no phrases")
    categories = list(base.categories)
    added = 0
    for entry in entries:
        name = entry["name"].strip()
        phrases = _unique(entry["phrases"])
        if not phrases:
            continue
        where = f"--vocab: {path} category {name!r}"
        existing = next((i for i, c in enumerate(categories) if c.name == name), None)
        if existing is not None:
            old = categories[existing]
            template = _check_template(entry.get("template", old.template), where)
            categories[existing] = replace(
                old, template=template, phrases=_unique(old.phrases + phrases),
                always_keep=bool(entry.get("always_keep", old.always_keep)),
            )
            continue
        new = Category(name, _check_template(entry.get("template", USER_TEMPLATE), where), phrases,
                       bool(entry.get("always_keep", False)))
        # new categories go right after subjects, in the order the file gives them
        subjects_at = next((i for i, c in enumerate(categories) if c.name == "subjects"), len(categories) - 1)
        categories.insert(subjects_at + 1 + added, new)
        added += 1
    return Vocabulary(categories)


def load_vocabulary(user_file: Path | None = None, builtin: bool = True) -> Vocabulary:
    vocab = builtin_vocabulary() if builtin else Vocabulary([])
    if user_file is not None:
        vocab = add_user_vocabulary(vocab, user_file)
    if vocab.size == 0:
        raise UserError("--no-builtin-vocab needs --vocab FILE with your own phrases")
    return vocab
