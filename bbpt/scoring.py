"""One call's worth of work: score a population of z on a batch, with gradients when the optimizer asks.

Gradient and derivative-free runs go through the same function, so both are measured on the same axes:
every candidate is one *call* (one forward over the batch); for backprop the backward pass is timed apart.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import numpy as np

from bbpt import objective
from bbpt.prompt import TextPrompts

log = logging.getLogger(__name__)


@dataclass
class Scored:
    losses: np.ndarray            # [pop]
    logprobs: np.ndarray          # [pop, n, C]
    grads: np.ndarray | None      # [pop, dim] when asked for
    tokens: int
    seconds: float                # forward (and backward) wall time
    backward_seconds: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    predictions: np.ndarray | None = None     # [pop, n] predicted class, -1 where an answer had none
    texts: tuple[str, ...] | None = None      # discrete prompts: each candidate's text
    per_prompt: list[dict] | None = None      # the backend's accounting per candidate
    biases: np.ndarray | None = None          # [pop, C] label bias fitted on this batch (calibration "bias")
    metrics: list[dict] | None = None         # per candidate: what its training scores say (stored per trial)


def score_prompts(backend, prompts, batch):
    """``backend.score``, except that a population of text prompts is scored once per distinct text (discrete
    spaces map many z to one text): repeats get the first one's scores. A backend with a request cache
    (``use_cache``) already sends each distinct request once and accounts repeats as cached, so it gets the
    population as it is."""
    if not isinstance(prompts, TextPrompts) or hasattr(backend, "use_cache"):
        return backend.score(prompts, batch)
    distinct, inverse = prompts.unique()
    if len(distinct) == len(prompts):
        return backend.score(prompts, batch)
    res = backend.score(distinct, batch)
    return replace(res, logprobs=res.logprobs[inverse], per_prompt=None,
                   predicted=None if res.predicted is None else res.predicted[inverse])


def fitness_at(res, labels, loss: str, bias=None) -> tuple[np.ndarray, np.ndarray | None]:
    """Losses and predictions of a scored population, after adding ``bias`` ``[pop, C]`` to its scores when
    given. Answers without scores (``predicted``) can only be right or wrong, so their loss is the error rate
    whatever ``loss`` says, and no bias applies to them. Generation scores (``target_tokens``) have no
    predictions: the loss is the NLL per target token."""
    if res.target_tokens is not None:
        return objective.target_loss(res.logprobs, res.target_tokens), None
    if res.predicted is not None:
        pred = np.asarray(res.predicted)
        return 1.0 - (pred == np.asarray(labels)[None]).mean(-1), pred
    lp = objective.calibrated(res.logprobs, bias)
    return objective.loss(lp, labels, loss), objective.predictions(lp)


def fitted_bias(res, labels, calibration: str):
    """The per-candidate label bias that ``calibration`` fits on these scores, or None (no calibration, or
    answers without scores)."""
    if calibration == "none" or res.predicted is not None or res.target_tokens is not None:
        return None
    return objective.fit_bias(res.logprobs, labels)


def fitness(res, labels, loss: str, calibration: str):
    """Losses, predictions and fitted bias (or None) of a scored population, as the search sees them."""
    bias = fitted_bias(res, labels, calibration)
    return (*fitness_at(res, labels, loss, bias), bias)


def score_population(backend, space, zs: np.ndarray, batch, labels, loss: str, need_grad: bool,
                     calibration: str = "none") -> Scored:
    """Score candidates on the training batch. With ``calibration="bias"`` each candidate's loss is the one
    it reaches with its best per-class bias on this batch (the bias is fitted here, per candidate, and
    returned): the search then optimises the prompt that will be used, calibrated."""
    start = time.perf_counter()
    if not need_grad:
        prompts = space.decode(zs)
        res = score_prompts(backend, prompts, batch)
        losses, pred, bias = fitness(res, labels, loss, calibration)
        return Scored(losses=losses, logprobs=res.logprobs, grads=None, tokens=res.tokens,
                      seconds=time.perf_counter() - start, bytes_sent=res.bytes_sent,
                      bytes_received=res.bytes_received, predictions=pred,
                      texts=prompts.texts if isinstance(prompts, TextPrompts) else None, per_prompt=res.per_prompt,
                      biases=bias, metrics=_train_metrics(losses, pred, labels, bias))
    import torch

    z = torch.tensor(np.asarray(zs), dtype=torch.float32, requires_grad=True)
    lp, tokens = backend.logprobs_torch(space.decode_torch(z), batch)
    logprobs = lp.detach().float().cpu().numpy()
    target_tokens = getattr(batch, "target_tokens", None)
    if target_tokens is not None:       # generation: the NLL per target token, no labels, no bias
        bias, pred = None, None
        losses = objective.target_loss(lp, target_tokens)
    else:
        bias = None if calibration == "none" else objective.fit_bias(logprobs, labels)
        # The bias is the minimiser of the loss for these scores, so (envelope theorem) the gradient of the
        # calibrated loss through the prompt is the gradient at the fitted bias, held fixed.
        losses = objective.loss(objective.calibrated(lp, bias), labels, loss)
        pred = objective.predictions(objective.calibrated(logprobs, bias))
    forward_done = time.perf_counter()
    losses.sum().backward()
    end = time.perf_counter()
    out = losses.detach().cpu().numpy().astype(np.float64)
    return Scored(losses=out, logprobs=logprobs, grads=z.grad.numpy().astype(np.float64), tokens=tokens,
                  seconds=end - start, backward_seconds=end - forward_done, predictions=pred, biases=bias,
                  metrics=_train_metrics(out, pred, labels, bias))


def _train_metrics(losses, pred, labels, bias) -> list[dict]:
    """Each candidate's training metrics as a trial stores them: accuracy (and its label bias) for
    classification, the mean target log-prob per token for generation."""
    if pred is None:
        return [{"logprob": -float(lo)} for lo in losses]
    out = [{"accuracy": float((p == np.asarray(labels)).mean())} for p in pred]
    if bias is not None:
        for m, b in zip(out, bias):
            m["bias"] = objective.bias_list(b)
    return out


def evaluate(backend, prompts, batch, labels, num_classes: int, bias=None, *, fit: str = "none",
             with_bias: bool = False):
    """Metrics of one prompt (offsets ΔP or a TextPrompts; None for no prompt) on an encoded split, with its
    label bias (``[C]``, fitted on train) added to the scores when given. ``fit`` (a calibration) fits the bias
    on this split's own scores instead, for the training split only; ``with_bias`` also returns the bias used.
    Returns (metrics, tokens, seconds[, bias])."""
    start = time.perf_counter()
    res = score_prompts(backend, prompts, batch)
    fitted = fitted_bias(res, labels, fit)
    if fitted is not None:
        bias = fitted[0]
    m = _split_metrics(res, labels, num_classes, None if bias is None else [bias])[0]
    out = (m, res.tokens, time.perf_counter() - start)
    return (*out, bias) if with_bias else out


def evaluate_many(backend, prompts, batch, labels, num_classes: int, biases) -> tuple[list[dict], int]:
    """:func:`evaluate` for several prompts of one space (``[k, ...]``) in one call, each with its own train-fitted
    label bias (``biases``: k of them, or None without calibration), so a backend can share work between them
    (a local infix call encodes each test input once for all k). Returns (metrics per prompt, tokens each)."""
    res = score_prompts(backend, prompts, batch)
    return _split_metrics(res, labels, num_classes, biases), res.tokens // len(res.logprobs)


def _split_metrics(res, labels, num_classes: int, biases) -> list[dict]:
    """Each scored prompt's metrics on a split (accuracy and F1, or the target NLL for generation), and loss."""
    bias = None
    if biases is not None and any(b is not None for b in biases):     # no bias adds nothing: zeros
        bias = np.array([np.zeros(res.logprobs.shape[-1]) if b is None else b for b in biases], np.float64)
    losses, pred = fitness_at(res, labels, "ce", bias)
    out = []
    for i, loss in enumerate(losses):
        if pred is None:
            m = objective.target_metrics(res.logprobs[i], res.target_tokens)
        else:
            m = objective.prediction_metrics(pred[i], labels, num_classes)
        m["loss"] = float(loss)
        out.append(m)
    return out


def answer_metrics(backend, prompts, task, split: str, max_new_tokens: int, template=None) -> dict:
    """Generation tasks: BLEU, ROUGE-L (and slot coverage for E2E) of the greedy answers of the one prompt in
    ``prompts`` (offsets ``[1, m, D]``; None: the template alone) on one split; {} for classification, or for a
    backend that cannot generate (it is then scored by likelihood only, and a warning says so)."""
    if task.kind != "generation":
        return {}
    if not hasattr(backend, "generate"):
        log.warning("this backend cannot generate text; %s is scored by likelihood only", split)
        return {}
    from bbpt.textmetrics import text_metrics

    examples = task.split(split)
    answers = backend.generate(None if prompts is None else prompts[0], examples, template or task.template, max_new_tokens=max_new_tokens,
                               stop=task.meta.get("stop"))
    return text_metrics(answers, examples, slots=task.meta.get("slots") == "e2e")


def train_bias(backend, prompts, batch, labels, calibration: str):
    """The label bias ``[C]`` of one prompt, fitted on the training batch (None without calibration), and
    the tokens it took to score that batch."""
    if calibration == "none":
        return None, 0
    _, tokens, _, bias = evaluate(backend, prompts, batch, labels, 1 + int(np.max(labels)), fit=calibration,
                                  with_bias=True)
    return bias, tokens
