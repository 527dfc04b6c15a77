"""Subspace Gauss-Newton on the label scores every backend returns: derivative-free, but not blind.

A black-box call returns more than a loss: the label log-probs of every training example, ``[n, C]``. CMA-ES
and Nevergrad see only the mean loss. This optimizer fits a linear model of all ``n × C`` scores around the
current point from the candidates it has scored (finite differences in random directions, then least squares
over the recent points, weighted by their distance), and minimises the exact cross-entropy of that model — calibrated by a fitted label
bias when the study calibrates — inside a trust region. The loss's curvature through the softmax is known, so
only the scores' first-order change has to be estimated; each generation is one proposed step plus
``popsize - 1`` probes around it, and the step is kept only if the scores it really gets are better.

It needs the scores, so ``tell`` reads them (``uses_scores``); everything else is the ask/tell protocol, and a
remote backend returns the same scores, so it works behind ``--backend api`` too.
"""

from __future__ import annotations

import logging

import numpy as np

from bbpt.objective import BIAS_RIDGE
from bbpt.optimizers._base import OptimizerSettings, PickledState

log = logging.getLogger(__name__)

GROW, SHRINK = 2.0, 0.5        # trust radius after a step that went as modelled / one that did not
MAX_MEMORY = 8                 # generations of points kept for the model, at most


class GaussNewton(PickledState):
    needs_gradient = False
    uses_scores = True

    def __init__(self, s: OptimizerSettings):
        if s.labels is None:
            raise ValueError("the Gauss-Newton optimizer needs the training labels (OptimizerSettings.labels)")
        self.labels = np.asarray(s.labels)
        self.calibrate = s.calibration == "bias"
        self.k = max(1, s.popsize - 1)                   # probes per generation
        self.rng = np.random.default_rng(s.seed + 1)
        # A probe of length σ0·√d moves each prompt entry by about α embedding stds, as one CMA-ES sample
        # does; the region starts at half that, and at most twice it.
        self.radius = 0.5 * s.sigma0 * np.sqrt(s.dim)
        self.max_radius, self.min_radius = 4 * self.radius, 1e-3 * self.radius
        self.center = np.asarray(s.x0, dtype=float)
        self.center_scores: np.ndarray | None = None
        self.center_loss = np.inf
        self.proposal = self.center.copy()
        self.predicted = np.inf                          # the model's loss at the proposal
        self.memory: list[tuple[np.ndarray, np.ndarray]] = []    # (zs, scores) of recent generations
        # Generations whose probes span about three quarters of z: more directions make fuller steps, older
        # points were scored around other centers. On 50-d synthetic problems with tanh-shaped scores (4 draws,
        # 12 generations of 10) keeping 4 generations ended at loss 0.33, 2 at 0.38, 6 and 8 at 0.36 (CMA-ES 0.76).
        self.keep = int(min(MAX_MEMORY, max(2, np.ceil(0.75 * s.dim / self.k))))

    def ask(self) -> np.ndarray:
        d = self.center.size
        g = self.rng.standard_normal((d, min(self.k, d)))
        q, _ = np.linalg.qr(g)                           # orthonormal directions: no probe repeats another
        probes = self.proposal + self.radius * q.T
        extra = self.k - q.shape[1]                      # popsize - 1 > d: the rest at random
        if extra > 0:
            u = self.rng.standard_normal((extra, d))
            probes = np.vstack([probes, self.proposal + self.radius * u / np.linalg.norm(u, axis=1, keepdims=True)])
        return np.vstack([self.proposal[None], probes])

    def tell(self, zs, losses, grads=None, scores=None) -> None:
        zs, scores = np.asarray(zs, dtype=float), np.asarray(scores, dtype=float)
        f = np.array([self._loss(s) for s in scores])
        best = int(np.argmin(f))
        losses_hoped = self.predicted
        if np.isfinite(self.center_loss):
            gain, hoped = self.center_loss - f[0], self.center_loss - self.predicted
            good = hoped > 0 and gain > 0.5 * hoped
            factor = GROW if good else (1.0 if gain > 0 else SHRINK)
            self.radius = float(np.clip(self.radius * factor, self.min_radius, self.max_radius))
        if f[best] < self.center_loss:
            self.center, self.center_scores, self.center_loss = zs[best].copy(), scores[best].copy(), f[best]
        self.memory = (self.memory + [(zs, scores)])[-self.keep:]
        self.proposal, self.predicted = self._step()
        log.debug("gn: proposal %.4f (model said %.4f), best probe %.4f, center %.4f; radius %.3g, next step "
                  "models %.4f", f[0], losses_hoped, f[1:].min() if len(f) > 1 else np.nan, self.center_loss,
                  self.radius, self.predicted)

    def _loss(self, s: np.ndarray) -> float:
        return _loss(s[None], self.labels, self.calibrate)[0]

    def _step(self) -> tuple[np.ndarray, float]:
        """The model's best point within the trust radius of the center, and the model's loss there."""
        xs = np.vstack([z for z, _ in self.memory]) - self.center
        ys = np.concatenate([s for _, s in self.memory]) - self.center_scores
        keep = np.linalg.norm(xs, axis=1) > 0            # the center itself says nothing about slopes
        xs, ys = xs[keep], ys[keep]
        if not len(xs):
            return self.center.copy(), self.center_loss
        # Weighted minimum-norm least squares for the linear model Y ≈ X J, points far from the center (scored
        # around earlier ones) counting less: a step δ = Xᵀa changes the scores by aᵀ G (W G + εI)⁻¹ W Y, with
        # G = X Xᵀ; directions outside the points' span are unknown, so not taken.
        gram = xs @ xs.T
        w = 1.0 / (1.0 + (np.linalg.norm(xs, axis=1) / (2 * self.radius)) ** 2)
        eps = 1e-8 * np.trace(gram) / len(gram)
        m = gram @ np.linalg.solve(w[:, None] * gram + eps * np.eye(len(gram)), w[:, None] * ys.reshape(len(ys), -1))
        m = m.reshape(ys.shape)
        a, value = _fit(self.center_scores, self.labels, m, gram, self.radius, self.calibrate)
        step = xs.T @ a
        norm = np.linalg.norm(step)
        if norm > self.radius:
            a, step = a * self.radius / norm, step * self.radius / norm
            value = _model_loss(self.center_scores, m, a, self.labels, self.calibrate)
        return self.center + step, value

    def stop(self) -> dict:
        return {}


def _loss(scores, labels, calibrate: bool) -> np.ndarray:
    """The (calibrated) cross-entropy of each of ``scores`` ``[pop, n, C]``, the bias's ridge included."""
    from bbpt.objective import fit_bias, loss

    if not calibrate:
        return loss(scores, labels)
    bias = fit_bias(scores, labels)
    return loss(scores + bias[:, None, :], labels) + 0.5 * BIAS_RIDGE * (bias ** 2).sum(-1)


def _model_loss(center, m, a, labels, calibrate: bool) -> float:
    return _loss((center + np.einsum("k,knc->nc", a, m))[None], labels, calibrate)[0]


def _fit(s0, labels, m, gram, radius, calibrate: bool):
    """Minimise over the step coefficients a (and the bias) the cross-entropy of ``s0 + Σ a_k m_k``, with a
    soft pull toward the trust radius, and return (a, the model's loss there)."""
    from scipy.optimize import minimize

    n, c = s0.shape
    onehot = np.eye(c)[labels]
    k = m.shape[0]
    mu = 1e-3 / max(radius ** 2, 1e-12)      # only to keep the problem bounded; the radius is enforced after

    def f(x):
        a, b = x[:k], (x[k:] if calibrate else 0.0)
        z = s0 + np.einsum("k,knc->nc", a, m) + b
        z = z - z.max(-1, keepdims=True)
        lse = np.log(np.exp(z).sum(-1, keepdims=True))
        p = np.exp(z - lse)
        val = (lse[:, 0] - (z * onehot).sum(-1)).mean()
        g = (p - onehot) / n
        ga = np.einsum("nc,knc->k", g, m) + mu * gram @ a
        val += 0.5 * mu * a @ gram @ a
        if not calibrate:
            return val, ga
        return val + 0.5 * BIAS_RIDGE * b @ b, np.concatenate([ga, g.sum(0) + BIAS_RIDGE * b])

    res = minimize(f, np.zeros(k + (c if calibrate else 0)), jac=True, method="L-BFGS-B",
                   options={"maxiter": 200})
    a = res.x[:k]
    return a, _model_loss(s0, m, a, labels, calibrate)
