"""Scores of generated text against references: corpus BLEU (sacrebleu), ROUGE-L (rouge-score) and, for
E2E-style data-to-text, slot coverage. Libraries do the metrics; only slot coverage is ours (no library
defines it for E2E's meaning representations)."""

from __future__ import annotations

import logging
import re

# rouge-score logs every scorer it builds through absl at INFO; one line per evaluation is noise.
logging.getLogger("absl").setLevel(logging.WARNING)

# E2E meaning representations: "name[The Eagle], eatType[pub], area[riverside]"
SLOT = re.compile(r"\s*([^\[\],]+)\[([^\]]*)\]")
# Slots whose value is never said literally ("familyFriendly[no]" reads "not family-friendly"): not counted.
UNSPOKEN_SLOTS = frozenset({"familyFriendly"})


def bleu(hypotheses: list[str], references: list[tuple[str, ...]]) -> tuple[float, str]:
    """Corpus BLEU over all references of each example (sacrebleu's defaults: 13a tokenizer, exponential
    smoothing; a variable number of references is padded with None, as sacrebleu allows), and its signature."""
    from sacrebleu.metrics import BLEU

    width = max(len(r) for r in references)
    streams = [[r[i].strip() if i < len(r) else None for r in references] for i in range(width)]
    metric = BLEU()
    score = metric.corpus_score([h.strip() for h in hypotheses], streams)
    return float(score.score), str(metric.get_signature())


def rouge_l(hypotheses: list[str], references: list[tuple[str, ...]]) -> float:
    """Mean over examples of ROUGE-L F1 against the best-matching reference (rouge-score, Porter stemming), ×100."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score_multi([r.strip() for r in refs], h.strip())["rougeL"].fmeasure
              for h, refs in zip(hypotheses, references)]
    return 100.0 * sum(scores) / max(len(scores), 1)


def slot_values(mr: str) -> list[tuple[str, str]]:
    """The (slot, value) pairs of an E2E meaning representation."""
    return [(k.strip(), v.strip()) for k, v in SLOT.findall(mr)]


def slot_coverage(hypotheses: list[str], inputs: list[str]) -> float:
    """Share (×100) of the inputs' slot values found verbatim, ignoring case, in the outputs: a cheap proxy for
    E2E's slot error rate (familyFriendly is left out: its yes/no is never spoken as such)."""
    found = total = 0
    for h, mr in zip(hypotheses, inputs):
        low = h.lower()
        for slot, value in slot_values(mr):
            if slot in UNSPOKEN_SLOTS or not value:
                continue
            total += 1
            found += value.lower() in low
    return 100.0 * found / total if total else float("nan")


def text_metrics(hypotheses: list[str], examples, slots: bool = False) -> dict:
    """BLEU, ROUGE-L (and slot coverage for E2E-style inputs) of ``hypotheses`` against each example's
    ``targets``; what ``bbpt eval`` and a study's final evaluations report for generation."""
    refs = [tuple(e.targets) for e in examples]
    score, signature = bleu(hypotheses, refs)
    out = {"bleu": score, "rouge_l": rouge_l(hypotheses, refs), "bleu_signature": signature}
    if slots:
        out["slot_coverage"] = slot_coverage(hypotheses, [e.text for e in examples])
    return out
