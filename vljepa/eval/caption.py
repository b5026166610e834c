"""Captioning metrics: CIDEr-D, BLEU-4 and ROUGE-L of hypotheses against reference captions.

Every caption is tokenised the same way before scoring (``tokenize_caption``): lower-cased, each
maximal run of letters and digits is a token, everything else (punctuation, apostrophes) is a
separator. COCO's evaluation tokenises with the Java PTB tokenizer instead; this machine-free
tokenisation agrees with it on plain captions such as the built-in world's, but splits
contractions differently ("don't" -> "don t", PTB: "do n't"), so scores on real captions with
contractions can differ slightly from COCO's published numbers.

Units: ``cider`` as pycocoevalcap reports it (a perfect match of a 4+-word caption scores 10.0,
COCO papers print it x100), ``bleu4`` and ``rougeL`` in [0, 1].
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import numpy as np

_TOKEN = re.compile(r"[a-z0-9]+")


def tokenize_caption(text: str) -> str:
    """Lower-case ``text`` and keep its runs of letters and digits, joined by single spaces."""
    return " ".join(_TOKEN.findall(text.lower()))


def _check(references: Sequence[Sequence[str]], hypotheses: Sequence[str]) -> None:
    if isinstance(hypotheses, str):
        raise TypeError("hypotheses must be a sequence of strings, one per item, not a single string")
    if len(references) != len(hypotheses):
        raise ValueError(f"got {len(hypotheses)} hypotheses for {len(references)} reference lists; "
                         "give one hypothesis per item")
    if not hypotheses:
        raise ValueError("no items to score; give at least one hypothesis with its references")
    for i, refs in enumerate(references):
        if isinstance(refs, str):
            raise TypeError(f"references[{i}] is a string; give a list of reference captions per item, "
                            f"e.g. [{refs!r}]")
        if len(refs) == 0:
            raise ValueError(f"references[{i}] is empty; every item needs at least one reference caption")


def cider_d(references: Sequence[Sequence[str]], hypotheses: Sequence[str]) -> tuple[float, np.ndarray]:
    """Corpus CIDEr-D and the per-item scores, with pycocoevalcap's scorer as COCO runs it.

    pycocoevalcap's ``Cider`` is the CIDEr-D variant (clipped n-gram counts, a Gaussian length
    penalty with sigma 6, n = 1..4, x10). Document frequencies, hence the idf weights, come from
    the references of the scored items themselves, so a corpus of one item, or n-grams that every
    item's references contain, carry no weight.

    Args:
        references: for each item, its reference captions (at least one).
        hypotheses: one generated caption per item.

    Returns:
        ``(corpus score, per-item scores [N])``; the corpus score is the mean of the per-item ones.
    """
    from pycocoevalcap.cider.cider import Cider

    _check(references, hypotheses)
    gts = {i: [tokenize_caption(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [tokenize_caption(h)] for i, h in enumerate(hypotheses)}
    score, scores = Cider().compute_score(gts, res)
    return float(score), np.asarray(scores, dtype=np.float64)


def bleu4(references: Sequence[Sequence[str]], hypotheses: Sequence[str]) -> float:
    """Corpus BLEU-4 (sacrebleu, default exponential smoothing) against all references, in [0, 1]."""
    import sacrebleu

    _check(references, hypotheses)
    hyps = [tokenize_caption(h) for h in hypotheses]
    # sacrebleu takes one stream per reference slot; None marks an item with fewer references.
    n_streams = max(len(refs) for refs in references)
    streams = [[tokenize_caption(refs[j]) if j < len(refs) else None for refs in references]
               for j in range(n_streams)]
    return sacrebleu.corpus_bleu(hyps, streams, tokenize="none").score / 100.0


def rouge_l(references: Sequence[Sequence[str]], hypotheses: Sequence[str]) -> float:
    """Mean over items of the best ROUGE-L F-measure (rouge-score) among the item's references."""
    from rouge_score import rouge_scorer

    _check(references, hypotheses)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    best = []
    for refs, hyp in zip(references, hypotheses):
        hyp = tokenize_caption(hyp)
        best.append(max(scorer.score(tokenize_caption(r), hyp)["rougeL"].fmeasure for r in refs))
    return float(np.mean(best))


def caption_scores(references: Sequence[Sequence[str]], hypotheses: Sequence[str]) -> dict[str, float]:
    """``{"cider", "bleu4", "rougeL"}`` of ``hypotheses`` against ``references`` (see the module doc)."""
    return {
        "cider": cider_d(references, hypotheses)[0],
        "bleu4": bleu4(references, hypotheses),
        "rougeL": rouge_l(references, hypotheses),
    }



@functools.lru_cache(maxsize=1)
def _world_grammar() -> tuple[dict[str, str], re.Pattern]:
    """Size synonyms -> size, and the pattern of one object phrase ("small red circle")."""
    from vljepa.data.world.scenes import COLORS, SHAPES, SIZE_WORDS

    sizes = {word: size for size, words in SIZE_WORDS.items() for word in words}
    phrase = re.compile(rf"\b({'|'.join(sizes)}) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})\b")
    return sizes, phrase


_VERTICAL = re.compile(r" and the (\w+ \w+) is (above|below) the (\w+ \w+)$")
# Phrasings of the built-in world's captions that name the objects right to left.
_RIGHT_TO_LEFT = ("from right to left", " to the right of ", " to its left")


def caption_facts(text: str) -> tuple[tuple[str, ...], tuple[str, str] | None]:
    """What a caption of the built-in world says: its objects left to right, and the vertical relation.

    Returns ``(objects, vertical)``: each object as "size colour shape" (size synonyms mapped to one
    word: "little" -> "small", "big" -> "large"), ordered left to right whichever way the caption
    phrases it ("from right to left: ...", "a B to the right of a A", "a B between a A on the left
    and a C on the right", ...); ``vertical`` is ``(upper, lower)`` ("colour shape" each) when the
    caption says which object is above the other, else None. Two captions with equal facts name the
    same objects with the same attributes in the same order, in any of the world's paraphrases.
    """
    sizes, phrase = _world_grammar()
    words = tokenize_caption(text)
    vertical = None
    match = _VERTICAL.search(words)
    if match:
        first, relation, second = match.groups()
        vertical = (first, second) if relation == "above" else (second, first)
        words = words[: match.start()]
    found = list(phrase.finditer(words))
    objects = [f"{sizes[m.group(1)]} {m.group(2)} {m.group(3)}" for m in found]
    first_on_right = bool(found) and words[found[0].end():].startswith(" on the right")
    if words.startswith("on the right") or first_on_right or any(p in words for p in _RIGHT_TO_LEFT):
        objects.reverse()
    elif " between " in words and len(objects) == 3:
        objects = [objects[1], objects[0], objects[2]]
    return tuple(objects), vertical
