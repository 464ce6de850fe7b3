"""From CLIP similarities to a caption.

Within each category the phrases compete: their cosine similarities to the image, times CLIP's
temperature, go through a softmax, so a score says how sure CLIP is of this phrase against the other
phrases of the same category (a raw cosine means little across models). A category gives its best
phrases, up to `top_k`, whose score reaches `threshold`; a category marked `always_keep` (subjects)
gives its best phrase in any case. The caption is the trigger word, then the chosen phrases in
category order: style words first.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.autolabel.vocab import Vocabulary


@dataclass(frozen=True)
class ScoredPhrase:
    category: str
    phrase: str
    similarity: float  # cosine between image and prompt features
    score: float  # softmax probability within the category


def rank_phrases(image_features, text_features, vocab: Vocabulary, logit_scale: float) -> list[dict[str, list[ScoredPhrase]]]:
    """For each image: category name -> its phrases, best first.

    `image_features` [N, D] and `text_features` [len(vocab.prompts()), D] are L2-normalised.
    """
    import torch

    similarity = image_features.float() @ text_features.float().T
    ranked: list[dict[str, list[ScoredPhrase]]] = [{} for _ in range(similarity.shape[0])]
    for category, start, end in vocab.spans():
        block = similarity[:, start:end]
        scores = torch.softmax(block * logit_scale, dim=-1)
        order = torch.argsort(block, dim=-1, descending=True, stable=True)
        for i in range(block.shape[0]):
            ranked[i][category.name] = [
                ScoredPhrase(category.name, category.phrases[j], float(block[i, j]), float(scores[i, j]))
                for j in order[i].tolist()
            ]
    return ranked


def choose_phrases(ranked: dict[str, list[ScoredPhrase]], vocab: Vocabulary, top_k: int, threshold: float) -> list[str]:
    chosen: list[str] = []
    for category in vocab.categories:
        phrases = ranked.get(category.name, [])
        picked = [p for p in phrases[:top_k] if p.score >= threshold]
        if not picked and category.always_keep and phrases:
            picked = phrases[:1]
        chosen.extend(p.phrase for p in picked if p.phrase not in chosen)
    return chosen


def compose_caption(phrases: list[str], trigger: str | None = None) -> str:
    parts = ([trigger.strip()] if trigger and trigger.strip() else []) + phrases
    return ", ".join(parts)
