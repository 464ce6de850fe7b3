"""Captions follow CLIP similarity: a phrase built to match an image is the one its caption gets."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from daemon.cli import main
from shared.autolabel.ranking import choose_phrases, compose_caption, rank_phrases
from shared.autolabel.vocab import Category, Vocabulary
from shared.fixtures.images import draw_shape
from shared.images.dataset import scan_dataset

SHAPES = [("circle", "red", "white"), ("square", "green", "black"), ("triangle", "blue", "grey"),
          ("circle", "yellow", "black")]
PHRASES = ["crimson disc", "emerald block", "azure wedge", "golden ring"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> tuple[Path, list[Path]]:
    folder = tmp_path_factory.mktemp("shapes")
    rng = random.Random(0)
    images = []
    for i, (shape, colour, background) in enumerate(SHAPES):
        path = folder / f"{i}_{colour}_{shape}.png"
        draw_shape(shape, colour, background, (64, 64), rng).save(path)
        images.append(path)
    return folder, images


def label_with(weights: dict, folder: Path, vocab: Path) -> dict[str, str]:
    assert main(["label", "--input", str(folder), "--model", str(weights["config"]), "--weights",
                 str(weights["weights"]), "--device", "cpu", "--no-builtin-vocab", "--vocab", str(vocab),
                 "--top-k", "1", "--threshold", "0", "--overwrite"]) == 0
    return {item.path.name: item.caption for item in scan_dataset(folder).items}


def test_the_phrase_built_to_match_an_image_comes_first(shapes, tmp_path):
    from shared.fixtures.tiny_clip import fit_text_to_images

    folder, images = shapes
    vocab = tmp_path / "things.json"
    vocab.write_text(json.dumps({"categories": [{"name": "things", "template": "{}", "phrases": PHRASES}]}))

    # text tower fitted so that PHRASES[i] lands on image i
    matched = fit_text_to_images(tmp_path / "m", PHRASES, images, steps=150, name="matched")
    captions = label_with(matched, folder, vocab)
    assert [captions[p.name] for p in images] == PHRASES

    # the same vocabulary against a tower fitted to a rotated mapping: the captions rotate with it,
    # so the order of the vocabulary file plays no part
    rotated = PHRASES[1:] + PHRASES[:1]
    shifted = fit_text_to_images(tmp_path / "m", rotated, images, steps=150, name="rotated")
    captions = label_with(shifted, folder, vocab)
    assert [captions[p.name] for p in images] == rotated


def test_ranking_is_the_order_of_clip_similarity(shapes, tmp_path):
    """The labeller's ranking equals the cosine order computed here with open_clip's own API."""
    import open_clip
    from PIL import Image

    from shared.autolabel.clip_model import load_clip
    from shared.autolabel.vocab import builtin_vocabulary
    from shared.fixtures.tiny_clip import build_tiny_clip

    folder, images = shapes
    tiny = build_tiny_clip(tmp_path / "tiny", seed=3)
    vocab = builtin_vocabulary()

    clip = load_clip(str(tiny["config"]), weights=tiny["weights"], device="cpu")
    pixels = torch.stack([clip.preprocess(Image.open(p).convert("RGB")) for p in images])
    ranked = rank_phrases(clip.encode_images(pixels), clip.encode_texts(vocab.prompts()), vocab, clip.logit_scale)

    model, _, preprocess = open_clip.create_model_and_transforms("tiny-clip-test", pretrained=str(tiny["weights"]))
    model.eval()
    tokenizer = open_clip.get_tokenizer("tiny-clip-test")
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(Image.open(p).convert("RGB")) for p in images]))
        img = img / img.norm(dim=-1, keepdim=True)
        for category in vocab.categories:
            txt = model.encode_text(tokenizer(category.prompts()))
            txt = txt / txt.norm(dim=-1, keepdim=True)
            sims = img @ txt.T
            for i in range(len(images)):
                got = ranked[i][category.name]
                expected = [category.phrases[j] for j in torch.argsort(sims[i], descending=True, stable=True)]
                assert [p.phrase for p in got] == expected
                assert [p.similarity for p in got] == pytest.approx(sorted(sims[i].tolist(), reverse=True), abs=1e-5)
                assert sum(p.score for p in got) == pytest.approx(1.0, abs=1e-5)


def _vocab() -> Vocabulary:
    return Vocabulary([
        Category("styles", "{}", ("anime", "watercolor", "pixel art")),
        Category("subjects", "{}", ("a cat", "a dog"), always_keep=True),
        Category("lighting", "{}", ("soft light",)),
    ])


def test_top_k_threshold_and_category_order():
    vocab = _vocab()
    text = torch.eye(6)
    # image 0: clearly anime, cat and dog alike; image 1: nothing stands out
    image = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1, 0.1, 0.5, 0.5, 0.3], [0.2] * 6]), dim=-1)
    ranked = rank_phrases(image, text, vocab, logit_scale=100.0)
    assert [p.phrase for p in ranked[0]["styles"]][0] == "anime"

    assert choose_phrases(ranked[0], vocab, top_k=2, threshold=0.3) == ["anime", "a cat", "a dog", "soft light"]
    assert choose_phrases(ranked[0], vocab, top_k=1, threshold=0.3) == ["anime", "a cat", "soft light"]
    # below the threshold everywhere: subjects still give their best phrase (always_keep); a category of one
    # phrase is always certain
    assert choose_phrases(ranked[1], vocab, top_k=2, threshold=0.6) == ["a cat", "soft light"]
    assert compose_caption(["anime", "a cat"], trigger=" sks ") == "sks, anime, a cat"
    assert compose_caption(["anime"], trigger=None) == "anime"


def test_text_features_computed_up_to_the_end_token_equal_open_clips(tmp_path):
    from shared.autolabel.clip_model import _encode_text_trimmed
    from shared.autolabel.vocab import builtin_vocabulary
    from shared.fixtures.tiny_clip import create_random, write_tiny_config

    model, _, tokenizer = create_random(write_tiny_config(tmp_path), seed=5)
    tokens = tokenizer(builtin_vocabulary().prompts())
    assert int(tokens.argmax(dim=-1).max()) + 1 < tokens.shape[1]  # there is padding to cut off
    with torch.no_grad():
        assert torch.allclose(_encode_text_trimmed(model, tokens), model.encode_text(tokens), atol=1e-5)
