"""CLIP tokenizers built offline from the BPE vocabulary that ships inside open_clip_torch.

The result gives the same ids as the tokenizer of openai/clip-vit-large-patch14 (SD1.x, SDXL's first
encoder); SD2 and SDXL's second encoder use the same BPE with "!" (id 0) as the padding token.
"""

from __future__ import annotations

import functools
import gzip
from importlib import resources

VOCAB_SIZE = 49408
MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_alphabet() -> list[str]:
    """The 256 stand-in characters byte-level BPE uses for raw bytes, in vocabulary order:
    printable Latin-1 bytes as themselves, then every other byte mapped past U+0100."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    bpe_file = resources.files("open_clip") / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(bpe_file.read_bytes()).decode("utf-8").split("\n")
    # line 0 is a version header; CLIP keeps the first 49152 - 256 - 2 merges
    merges = lines[1 : VOCAB_SIZE - 256 - 256 - 2 + 1]
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    assert len(tokens) == VOCAB_SIZE, len(tokens)
    return {tok: i for i, tok in enumerate(tokens)}, merges


def clip_tokenizer(pad_token: str = EOS):
    """A transformers CLIPTokenizer, built without any download. `pad_token="!"` for OpenCLIP models."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=[tuple(m.split()) for m in merges],
        pad_token=pad_token,
        model_max_length=MAX_LENGTH,
    )
