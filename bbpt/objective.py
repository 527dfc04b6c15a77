"""From label log-probs to a loss per candidate, and to the metrics reported on dev and test.

Scores arrive as ``[pop, n, C]`` log-probabilities of each class's first label token. The loss restricts them
to the label set (a softmax over the C label words, as BBT does), so a backend may return raw logits or
full-vocabulary log-probs and the loss is the same.
"""

from __future__ import annotations

import numpy as np

from bbpt.errors import ConfigError, ObjectiveError

LOSSES = ("ce", "hinge")
CALIBRATIONS = ("none", "bias")
# A small ridge fixes the bias's free constant (adding c to every class changes nothing) and keeps it finite
# when a class never wins; at 1e-3 it moves a fitted bias by well under 1 % on the built-in tasks.
BIAS_RIDGE = 1e-3


def _torch():
    import torch

    return torch


def loss(logprobs, labels, kind: str = "ce"):
    """Mean loss per candidate, shape ``[pop]``; torch in, torch out (differentiable), numpy in, numpy out."""
    torch = _torch()
    as_numpy = not isinstance(logprobs, torch.Tensor)
    lp = torch.as_tensor(np.asarray(logprobs, dtype=np.float32)) if as_numpy else logprobs
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=lp.device)
    _check_finite(lp)
    restricted = torch.log_softmax(lp, dim=-1)
    gold = restricted.gather(-1, y.view(1, -1, 1).expand(lp.shape[0], -1, 1)).squeeze(-1)
    if kind == "ce":
        out = -gold.mean(-1)
    elif kind == "hinge":
        # BBT's margin loss: the gold label must beat the best wrong label by a margin of 1 (in logits).
        wrong = restricted.scatter(-1, y.view(1, -1, 1).expand(lp.shape[0], -1, 1), float("-inf"))
        out = torch.clamp(1.0 - (gold - wrong.max(-1).values), min=0).mean(-1)
    else:
        raise ConfigError(f"unknown loss {kind!r}; choose one of {LOSSES}")
    return out.detach().cpu().numpy().astype(np.float64) if as_numpy else out


def target_loss(logprobs, target_tokens):
    """Generation: each candidate's mean negative log-likelihood per target token, ``[pop]``, from its summed
    target log-probs ``[pop, n]`` and the targets' lengths ``[n]`` (long answers weigh by their tokens, as a
    language-model loss does); torch in, torch out, numpy in, numpy out."""
    torch = _torch()
    if isinstance(logprobs, torch.Tensor):
        _check_finite(logprobs)
        return -logprobs.sum(-1) / float(np.sum(target_tokens))
    lp = np.asarray(logprobs, dtype=np.float64)
    _check_finite(torch.as_tensor(lp))
    return -lp.sum(-1) / float(np.sum(target_tokens))


def target_metrics(logprobs_one, target_tokens) -> dict[str, float]:
    """Dev/test metrics of one candidate's target log-probs ``[n]``: mean log-prob per target token (higher is
    better: what selection compares), its negation the NLL, and the perplexity."""
    nll = float(target_loss(np.asarray(logprobs_one)[None], target_tokens)[0])
    return {"logprob": -nll, "nll": nll, "perplexity": float(np.exp(min(nll, 700.0)))}


def fit_bias(logprobs, labels, ridge: float = BIAS_RIDGE, iters: int = 50) -> np.ndarray:
    """The per-class bias b ``[pop, C]`` that minimises each candidate's cross-entropy of softmax(scores + b)
    on ``labels``, plus ``ridge/2·|b|²``: a strictly convex problem of C numbers, solved by Newton's method
    with backtracking, all candidates at once (milliseconds, no model calls).

    Small causal LMs put most of their mass on one label word on many-class tasks; this corrects that prior
    (contextual calibration, learned rather than probed with a content-free input). Fit it on the training
    scores only: the study loop never shows it dev or test labels.
    """
    lp = np.asarray(logprobs, dtype=np.float64)
    _check_finite(_torch().as_tensor(lp))
    lp = lp - lp.max(-1, keepdims=True)
    pop, n, c = lp.shape
    onehot = np.eye(c)[np.asarray(labels)]                       # [n, C]
    b = np.zeros((pop, c))

    def objective(bias):
        z = lp + bias[:, None, :]
        return (np.logaddexp.reduce(z, -1) - (z * onehot).sum(-1)).mean(-1) + 0.5 * ridge * (bias ** 2).sum(-1)

    f = objective(b)
    for _ in range(iters):
        z = lp + b[:, None, :]
        p = np.exp(z - np.logaddexp.reduce(z, -1, keepdims=True))            # [pop, n, C]
        grad = (p - onehot).mean(1) + ridge * b
        hess = (np.einsum("pnc,cd->pcd", p, np.eye(c)) - np.einsum("pnc,pnd->pcd", p, p)) / n \
            + ridge * np.eye(c)
        step = np.linalg.solve(hess, grad[..., None])[..., 0]
        t = np.ones(pop)
        for _ in range(30):        # halve each candidate's step until its objective does not rise
            new = objective(b - t[:, None] * step)
            worse = new > f + 1e-12
            if not worse.any():
                break
            t[worse] *= 0.5
        b = b - t[:, None] * step
        f = objective(b)
        if np.abs(grad).max() < 1e-9:
            break
    return b


def bias_list(bias) -> list[float]:
    """A label bias as stored with a trial or an evaluation (JSON; 6 decimals, far below any score's noise)."""
    return [round(float(v), 6) for v in bias]


def calibrated(logprobs, bias):
    """Scores ``[pop, n, C]`` plus each candidate's label bias ``[pop, C]`` (None: unchanged); torch or numpy."""
    if bias is None:
        return logprobs
    torch = _torch()
    if isinstance(logprobs, torch.Tensor):
        return logprobs + torch.as_tensor(np.asarray(bias), dtype=logprobs.dtype, device=logprobs.device)[:, None]
    return np.asarray(logprobs) + np.asarray(bias)[:, None, :]


def _check_finite(lp) -> None:
    torch = _torch()
    bad = ~torch.isfinite(lp.detach())
    if bad.any():
        cands = sorted({int(i) for i in bad.nonzero()[:, 0].tolist()})
        value = lp.detach()[bad][0].item()
        raise ObjectiveError(f"scores for candidate(s) {cands[:10]} contain {value} (not finite); the prompt has "
                             "diverged or the backend returned garbage: lower --sigma0/--lr or check the backend")


def predictions(logprobs) -> np.ndarray:
    """Predicted class per candidate and example, ``[pop, n]``."""
    return np.asarray(logprobs).argmax(-1)


def accuracy(pred: np.ndarray, labels) -> float:
    return float((np.asarray(pred) == np.asarray(labels)).mean())


def macro_f1(pred: np.ndarray, labels, num_classes: int) -> float:
    pred, labels = np.asarray(pred), np.asarray(labels)
    f1s = []
    for c in range(num_classes):
        tp = np.sum((pred == c) & (labels == c))
        denom = np.sum(pred == c) + np.sum(labels == c)
        f1s.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(f1s))


def metrics(logprobs_one, labels, num_classes: int) -> dict[str, float]:
    """Accuracy and macro-F1 of one candidate's scores ``[n, C]``."""
    return prediction_metrics(predictions(logprobs_one), labels, num_classes)


def prediction_metrics(pred, labels, num_classes: int) -> dict[str, float]:
    """Accuracy and macro-F1 of one candidate's predicted classes (-1, no answer, is wrong for every class)."""
    return {"accuracy": accuracy(pred, labels), "f1": macro_f1(pred, labels, num_classes)}
