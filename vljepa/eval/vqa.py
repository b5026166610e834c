"""VQA accuracy: exact match of a predicted answer string against the accepted answers.

Both sides are normalised first (case, whitespace, trailing punctuation, a leading article), so
"The red cube." and "red cube" match. This is plain exact match, not the VQAv2 consensus score
(min(#annotators agreeing / 3, 1)).
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

_ARTICLES = ("a", "an", "the")


def normalize_answer(text: str) -> str:
    """Lower-case, collapse whitespace, strip trailing punctuation, drop one leading article.

    An article that is the whole answer is kept ("a" may be a legitimate answer, e.g. an option
    letter).
    """
    # Whitespace is collapsed to single spaces first, so one rstrip removes "red . !" tails.
    answer = " ".join(text.lower().split()).rstrip(string.punctuation + " ")
    words = answer.split(" ")
    if len(words) > 1 and words[0] in _ARTICLES:
        answer = " ".join(words[1:])
    return answer


def vqa_metrics(
    predictions: Sequence[str],
    answers: Sequence[Sequence[str]],
    types: Sequence[str],
) -> dict[str, Any]:
    """Exact-match accuracy, overall and per question type.

    Args:
        predictions: one predicted answer per question.
        answers: for each question, the accepted answers (a list, even when there is one).
        types: the question type of each question (e.g. "color", "count").

    Returns:
        ``{"accuracy": float, "n": int, "per_type": {type: {"accuracy": float, "n": int}}}``,
        with ``per_type`` sorted by type name.
    """
    if not len(predictions) == len(answers) == len(types):
        raise ValueError(
            f"predictions, answers and types must have one entry per question, got "
            f"{len(predictions)}, {len(answers)} and {len(types)}"
        )
    if not predictions:
        raise ValueError("no predictions to score")
    per_type: dict[str, list[int]] = {}  # type -> [correct, n]
    for i, (pred, accepted, qtype) in enumerate(zip(predictions, answers, types)):
        if isinstance(accepted, str):
            # A bare string would be iterated character by character and match single letters.
            raise TypeError(
                f"answers[{i}] must be a list of accepted answers, got the string {accepted!r}; "
                f"wrap it as [{accepted!r}]"
            )
        if not accepted:
            raise ValueError(f"question {i} has no accepted answer")
        hit = normalize_answer(pred) in {normalize_answer(a) for a in accepted}
        counts = per_type.setdefault(qtype, [0, 0])
        counts[0] += hit
        counts[1] += 1
    correct = sum(c for c, _ in per_type.values())
    return {
        "accuracy": correct / len(predictions),
        "n": len(predictions),
        "per_type": {
            qtype: {"accuracy": c / n, "n": n} for qtype, (c, n) in sorted(per_type.items())
        },
    }
