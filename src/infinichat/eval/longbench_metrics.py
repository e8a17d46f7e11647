"""The LongBench metrics (Bai et al. 2023, https://arxiv.org/abs/2308.14508), written from their definitions.

Each metric scores one prediction against one reference in [0, 1]; a sample scores the best over its
references, a dataset 100 x the mean over samples (`score_sample`, `dataset_score`).

- `qa_f1`: SQuAD-style token F1 after `normalize_answer` (lowercase, drop punctuation, drop the articles
  a/an/the, fold white space).
- `rouge_l`: ROUGE-L F1 from the longest common subsequence of the lowercased white-space tokens of the two
  texts (one sequence each; the `rouge` package LongBench uses takes a union LCS over sentences, which can
  differ slightly on multi-sentence texts).
- `classification`: the classes named in the prediction, minus those that are only a part of the reference
  class; 1/len(matches) when the reference is among them, else 0 (trec).
- `retrieval`: the share of the numbers in the prediction that equal the reference paragraph number.
- `count`: the share of the numbers in the prediction that equal the reference count.
- `code_sim`: edit similarity (difflib's ratio, 2 x matches / total length) between the reference line and
  the first prediction line that is not a comment or a code fence.
"""

from __future__ import annotations

import difflib
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def token_f1(pred: Sequence[str], ref: Sequence[str]) -> float:
    common = Counter(pred) & Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, reference: str, **_) -> float:
    return token_f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Longest common subsequence length, O(len(a) * len(b)) time, O(len(b)) memory."""
    if not a or not b:
        return 0
    row = [0] * (len(b) + 1)
    for x in a:
        diag = 0  # row[j - 1] of the previous row
        for j, y in enumerate(b, 1):
            up = row[j]
            row[j] = diag + 1 if x == y else max(row[j], row[j - 1])
            diag = up
    return row[-1]


def rouge_l(prediction: str, reference: str, **_) -> float:
    pred, ref = prediction.lower().split(), reference.lower().split()
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def classification(prediction: str, reference: str, all_classes: Sequence[str] = (), **_) -> float:
    matches = [c for c in all_classes if c in prediction]
    matches = [c for c in matches if not (c in reference and c != reference)]
    return 1.0 / len(matches) if reference in matches else 0.0


def _number_share(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


def retrieval(prediction: str, reference: str, **_) -> float:
    m = re.search(r"Paragraph (\d+)", reference)
    return _number_share(prediction, m.group(1)) if m else 0.0


def count(prediction: str, reference: str, **_) -> float:
    return _number_share(prediction, str(reference).strip())


def code_sim(prediction: str, reference: str, **_) -> float:
    line = next((ln for ln in prediction.lstrip("\n").split("\n") if not any(t in ln for t in ("`", "#", "//"))), "")
    return difflib.SequenceMatcher(None, line, reference).ratio()


METRICS: dict[str, Callable[..., float]] = {
    "qa_f1": qa_f1,
    "rouge_l": rouge_l,
    "classification": classification,
    "retrieval": retrieval,
    "count": count,
    "code_sim": code_sim,
}


def score_sample(metric: str, prediction: str, references: Sequence[str], all_classes: Sequence[str] = ()) -> float:
    """The best score of `prediction` over the references (0 when there are none)."""
    fn = METRICS[metric]
    return max((fn(prediction, str(ref), all_classes=all_classes or ()) for ref in references), default=0.0)


def dataset_score(scores: Sequence[float]) -> float | None:
    """100 x the mean, as LongBench reports it (None for no samples)."""
    return 100.0 * sum(scores) / len(scores) if scores else None
