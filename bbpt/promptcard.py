"""What a tuned prompt is, read off its saved directory: the card ``bbpt inspect`` prints and the dashboard shows.

For a soft prompt, each virtual token's nearest vocabulary tokens (cosine similarity to the model's input
embeddings), its norm against the norms of the vocabulary's embeddings, and how far it moved from P0; the
nearest-token hard prompt (each virtual token replaced by its nearest real one), whose score costs calls and is
computed only when asked (:func:`score_hard_prompt`). For a discrete prompt, its text. Both with the dev score
that selected the prompt and the test score, which selection never read.

Only the input layer is described: a deep prompt's or a prefix's tensors below it are hidden states and keys/
values, with no vocabulary to compare against (the card says which depth it was tuned at).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bbpt.errors import ConfigError
from bbpt.prompt import PromptInit, SavedPrompt

NEAREST = 5


@dataclass
class Vocabulary:
    """A model's input embeddings and tokenizer, read without loading the transformer."""

    embeddings: np.ndarray      # [V, D] float32
    tokenizer: object

    @classmethod
    def load(cls, model: str) -> "Vocabulary":
        from transformers import AutoTokenizer

        from adapters.default_model import resolve_model
        from adapters.embedding_table import load_input_embeddings

        path = resolve_model(model)
        if not Path(path).is_dir():
            raise ConfigError(f"model {model!r} is not a local directory, so its embedding table cannot be read "
                              "to describe the prompt; pass --model with the model's local folder")
        table, _ = load_input_embeddings(path)
        return cls(table.numpy().astype(np.float32), AutoTokenizer.from_pretrained(path))


def initial_prompt(saved: SavedPrompt, vocab: Vocabulary) -> np.ndarray | None:
    """P0, rebuilt from the recorded init (None for zeros: there is nothing to drift from)."""
    from adapters.hf import init_token_ids

    meta = saved.meta
    kind, _, text = meta.get("init", "zeros").partition(":")
    if kind == "zeros":
        return None
    if kind == "labels":
        text = " ".join(w.strip() for w in meta["label_words"])
    init = PromptInit(kind, int(meta["tokens"]), int(meta.get("config", {}).get("seed", 0)), text)
    return vocab.embeddings[init_token_ids(vocab.tokenizer, len(vocab.embeddings), init)]


def input_matrix(saved: SavedPrompt, p0: np.ndarray | None) -> np.ndarray:
    """The input-layer prompt P (m × D): saved whole, or (tuned through a remote backend) as its offset."""
    if saved.meta.get("prompt_is", "").startswith("delta"):
        return saved.prompt + (p0 if p0 is not None else 0.0)
    return saved.prompt


def card(saved: SavedPrompt, vocab: Vocabulary | None = None, k: int = NEAREST) -> dict:
    """The prompt card as plain data (JSON-ready)."""
    meta = saved.meta
    scores = {"metric": _metric(meta),
              "dev": meta.get("dev"), "test": meta.get("test"),
              "test_note": "not used for selection: scored once, after the search"}
    out = dict(study=meta.get("study"), model=meta.get("model"), task=meta.get("task"),
               template=meta.get("template"), depth=saved.depth, scores=scores)
    if saved.text is not None:
        return dict(out, kind="text", text=saved.text)
    if vocab is None:
        raise ConfigError("describing a soft prompt needs the model's vocabulary (Vocabulary.load)")
    if saved.prompt.shape[1] != vocab.embeddings.shape[1]:
        raise ConfigError(f"prompt of {meta.get('study')!r} is {saved.prompt.shape[1]} wide but the model's "
                          f"embeddings are {vocab.embeddings.shape[1]}; describe it with the model it was tuned for")
    p0 = initial_prompt(saved, vocab)
    P = input_matrix(saved, p0).astype(np.float32)
    E = vocab.embeddings
    e_norms = np.linalg.norm(E, axis=1)
    cos = (P / np.maximum(np.linalg.norm(P, axis=1, keepdims=True), 1e-12)) @ (E / np.maximum(e_norms, 1e-12)[:, None]).T
    top = np.argsort(-cos, axis=1)[:, :k]
    rows = []
    for i in range(P.shape[0]):
        norm = float(np.linalg.norm(P[i]))
        row = dict(position=i, norm=round(norm, 4),
                   norm_percentile=round(float(100 * np.mean(e_norms <= norm)), 1),
                   nearest=[dict(token=vocab.tokenizer.decode([int(t)]), id=int(t), cosine=round(float(cos[i, t]), 4))
                            for t in top[i]])
        if p0 is not None:
            ref = float(np.linalg.norm(p0[i]))
            row["drift"] = round(float(np.linalg.norm(P[i] - p0[i])) / max(ref, 1e-12), 4)
        rows.append(row)
    hard = [int(t) for t in top[:, 0]]
    return dict(out, kind="soft", tokens=rows, hard_prompt=vocab.tokenizer.decode(hard), hard_prompt_ids=hard,
                embedding_norms=dict(median=round(float(np.median(e_norms)), 4),
                                     p99=round(float(np.percentile(e_norms, 99)), 4)))


def _metric(meta: dict) -> str:
    """What the study selected on: the built-in task's metric (macro-F1 on MRPC), accuracy for user data,
    the NLL for generation."""
    from bbpt.tasks.builtin import CLASSIFICATION

    if meta.get("kind") == "generation":
        return "nll"
    spec = CLASSIFICATION.get(meta.get("task") or "")
    return spec.metric if spec else "accuracy"


def score_hard_prompt(directory: str | Path, info: dict, device: str = "auto") -> dict:
    """Dev scores of the nearest-token hard prompt (the card's ``hard_prompt_ids`` as the prompt's rows), with
    the tuned prompt's own label bias: what snapping the prompt to real tokens keeps. Costs one call over dev."""
    from adapters.hf import HFBackend
    from bbpt.config import StudyConfig
    from bbpt.scoring import evaluate
    from bbpt.session import load_task_for

    saved = SavedPrompt.load(directory)
    cfg = StudyConfig.from_dict(saved.meta["config"])
    task = load_task_for(cfg)
    backend = HFBackend(saved.meta["model"], device=device)
    try:
        ids = np.asarray(info["hard_prompt_ids"])
        rows = backend.embedding.weight[backend.torch.as_tensor(ids)].detach().float().cpu().numpy()
        backend.set_init(PromptInit("zeros", len(ids)))
        batch = backend.encode(task.dev, task.template, task.label_words)
        m, tokens, secs = evaluate(backend, rows[None], batch, [e.label for e in task.dev], task.num_classes,
                                   saved.bias)
    finally:
        backend.close()
    return dict(split="dev", examples=len(task.dev), tokens=tokens, seconds=round(secs, 2),
                **{k: m[k] for k in ("accuracy", "f1", "loss") if k in m})


def format_card(c: dict) -> str:
    """The card as terminal text."""
    s = c["scores"]
    metric = s["metric"]

    def pct(split):
        v = (s.get(split) or {}).get(metric)
        return f"{100 * v:.1f}" if isinstance(v, (int, float)) else "-"

    lines = [f"prompt of {c['study']} ({c['task']}, {c['model']}, depth {c['depth']})",
             f"  dev {metric} {pct('dev')} (selected on it); test {metric} {pct('test')} ({s['test_note']})"]
    if c["kind"] == "text":
        return "\n".join(lines + ["  text: " + repr(c["text"])])
    n = c["embedding_norms"]
    lines.append(f"  vocabulary embedding norms: median {n['median']:.3f}, 99th percentile {n['p99']:.3f}")
    lines.append(f"  {'pos':>3} {'norm':>7} {'pctl':>5} {'drift':>6}  nearest tokens (cosine)")
    for r in c["tokens"]:
        near = ", ".join(f"{t['token']!r} {t['cosine']:.2f}" for t in r["nearest"])
        drift = f"{r['drift']:.2f}" if "drift" in r else "-"
        lines.append(f"  {r['position']:>3} {r['norm']:>7.3f} {r['norm_percentile']:>5.1f} {drift:>6}  {near}")
    lines.append(f"  nearest-token hard prompt: {c['hard_prompt']!r}")
    if "hard_prompt_dev" in c:
        h = c["hard_prompt_dev"]
        lines.append(f"  hard prompt on dev ({h['examples']} examples, the tuned prompt's label bias): "
                     f"{metric} {100 * h[metric]:.1f}")
    return "\n".join(lines)
