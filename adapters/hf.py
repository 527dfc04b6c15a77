"""Local backend: a transformers causal LM on CPU or CUDA, with gradients for backprop.

The prompt enters through ``inputs_embeds`` and reused keys/values through the model's cache argument (no model
code is forked or patched), so any causal LM that transformers loads works. Every score equals the unpadded
one-example reference: sequences are left-padded with explicit position ids, and only the last position
reaches the LM head (``logits_to_keep=1``). The head still spans the whole vocabulary there, because a label
word's log-prob needs the softmax's normaliser; at one position per sequence that is about 1.5 % of a call
on SmolLM2. A population is scored in as few forwards as a token budget allows: (candidate, example) pairs
sorted by length and cut where the least padding results (:func:`plan_chunks`; 2,048 tokens per forward
measured fastest on 2 CPU cores: 2.5 s per candidate vs 4.7 s at 8,192).

Black-box scoring (``score``) skips work whose result cannot have changed, by where the template puts the
prompt (``benchmarks/scoring.py`` measures each step):

- **prefix** (every example has the same text before the prompt, often none): that text's keys/values are
  computed once per batch, the prompt's once per candidate, and each example then runs only its own tokens
  against them (m tokens fewer per example);
- **infix** (``{text}`` … ``{prompt}`` cue): each example's text before the prompt is encoded once and its
  keys/values kept with the batch, so a call computes only the prompt and the tokens after it. Kept caches
  are bounded by ``kv_cache_mb`` over all batches (least recently used dropped first). A batch too large
  for it (a full test set) is scored uncached for one prompt; for several (a study's test curve) its inputs
  are encoded a group at a time, once for them all, and dropped.

The differentiable path (``logprobs_torch``) always recomputes whole sequences: it is the reference the
cached paths are tested against, and backprop needs the graph through every token anyway.
"""

from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from adapters._base import ModelInfo, PromptSite, ScoreResult
from adapters._deep import decoder_layers, pick_layers, robust_std
from adapters._kv import KV, SharedKV, common_head, forward_last, forward_slots, reuse_works, slots_work
from adapters.default_model import resolve_model
from bbpt.errors import BackendError, ConfigError
from bbpt.prompt import PromptInit, TextPrompts
from bbpt.tasks import Example, Template

log = logging.getLogger(__name__)

# BBT samples its random-vocabulary init from the first 5,000 ids (frequent tokens in BPE vocabularies).
VOCAB_INIT_RANGE = 5000
# Leading tokens every example shares (demonstrations, ``--demos``) are encoded once and kept once when they are
# at least this many; a template's few shared words ("Review:") are not worth splitting the cache for.
SHARED_HEAD_MIN = 32


@dataclass(eq=False)      # compared by identity: the backend keys its cache bookkeeping on the object
class EncodedBatch:
    """Token ids of each example's text before and after the prompt, and the label words' first tokens.

    Generation batches have ``targets`` instead of label ids: each example's reference answer (its first), as
    token ids ending with the end-of-sequence token, so a tuned prompt also learns to stop. Those ids are the
    last tokens of ``after``: every scoring path runs them teacher-forced, and only the readout differs.
    """

    before: list[list[int]]
    after: list[list[int]]
    label_ids: list[int]
    embeds: list = None          # per example: (before embeds, after embeds), filled lazily
    kv: KV | None = None         # keys/values of the text before the prompt, kept by the backend's budget
    examples: list = None        # the examples and template themselves, for discrete (text) prompts
    template: Template = None
    targets: list[list[int]] | None = None      # generation: each example's target ids (the end of ``after``)

    @property
    def n(self) -> int:
        return len(self.after)

    @property
    def target_tokens(self):
        """Generation: each example's target length in tokens ``[n]``; None for classification."""
        return None if self.targets is None else np.array([len(t) for t in self.targets])

    @property
    def shared_head(self) -> bool:
        """The same tokens precede the prompt in every example (the prefix placement)."""
        return all(b == self.before[0] for b in self.before)


def _pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device!r} asked for CUDA but torch sees no GPU; use --device cpu or auto")
    return device


def _cpu_has_fast(dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` natively (bf16: AVX512-BF16 or AMX; float16: AMX-FP16)."""
    import torch

    cpu = torch.cpu
    try:
        if dtype == torch.bfloat16:
            return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
        if dtype == torch.float16:
            return bool(cpu._is_amx_fp16_supported())
    except AttributeError:      # a torch without these probes: say nothing rather than guess
        return True
    return True


# Tokens per forward and MB of keys/values kept across calls, by device. The CPU's are what every CPU number in
# the README was measured with; a GPU is mostly idle in a SmolLM2 forward of 2,048 tokens (kernel launches
# dominate), so it takes 8x the tokens, and it has the memory to keep every task's encoded inputs.
DEVICE_LIMITS = {"cpu": (2048, 1024.0), "cuda": (16384, 8192.0)}
# One packed row's new tokens at most (forward_slots): its mask and attention weights grow with the row's
# length squared, and a GPU's token budget (16,384) in one row would need ~10 GB of attention weights.
PACKED_ROW = 2048
MIN_BATCH_TOKENS = 256      # below this a forward is mostly overhead: out of memory there is the device's fault


class HFBackend:
    """A Hugging Face causal LM on this machine. ``model`` is a bbpt model name, a directory or a hub id.

    ``reuse_kv=False`` scores every call by whole-sequence forwards (the reference path); ``kv_cache_mb``
    bounds the keys/values kept across calls; ``compile`` wraps the forward in ``torch.compile`` on CUDA only.
    ``max_batch_tokens`` and ``kv_cache_mb`` default by device (:data:`DEVICE_LIMITS`).
    """

    def __init__(self, model: str = "smollm2-135m", *, device: str = "auto", dtype: str = "float32",
                 max_batch_tokens: int | None = None, model_obj=None, tokenizer=None, reuse_kv: bool = True,
                 kv_cache_mb: float | None = None, compile: bool = False, pack: bool = True):
        import torch

        self.torch = torch
        self.name = model
        self.device = _pick_device(device)
        try:
            self.dtype = getattr(torch, dtype)
        except AttributeError:
            raise ConfigError(f"unknown --dtype {dtype!r}; use float32, bfloat16 or float16") from None
        if self.dtype != torch.float32 and self.device == "cpu" and not _cpu_has_fast(self.dtype):
            # bfloat16 pays on CPUs with bf16 dot-product instructions (AVX512-BF16, AMX: calls ~2x cheaper on
            # a Zen 4 EPYC, benchmarks/dtype.py); elsewhere it is emulated, slower than float32.
            log.warning("--dtype %s: this CPU has no %s instructions, so it is slower than float32 here (and its "
                        "scores are rounder); use float32, or a GPU", dtype, dtype)
        if model_obj is None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            path = resolve_model(model)
            try:
                tokenizer = AutoTokenizer.from_pretrained(path)
                model_obj = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype)
            except OSError as e:
                raise BackendError(f"could not load model {model!r} ({e}); pass a local directory with "
                                   "config.json and weights, or the default smollm2-135m") from None
        self.tokenizer = tokenizer
        self.model = model_obj.to(device=self.device, dtype=self.dtype).eval()
        self.model.requires_grad_(False)
        if compile and self.device.startswith("cuda"):
            # Shapes change with every chunk, hence dynamic; on CPU compiling costs minutes and gains little.
            self.model.forward = torch.compile(self.model.forward, dynamic=True)
        elif compile:
            log.warning("torch.compile is only used on CUDA; scoring on %s uncompiled", self.device)
        self.embedding = self.model.get_input_embeddings()
        head = getattr(self.model, "get_output_embeddings", lambda: None)()
        if head is not None:
            # ``logits_to_keep=1`` hands the LM head a strided [B, 1, D] slice, which torch multiplies as B
            # separate vector-matrix products, reading the whole [V, D] matrix B times (9 % of a call measured
            # on SmolLM2). A contiguous copy of B rows makes it one matrix product; the values are the same.
            head.register_forward_pre_hook(lambda _, args: (args[0].contiguous(), *args[1:]))
        limits = DEVICE_LIMITS["cuda" if self.device.startswith("cuda") else "cpu"]
        self.max_batch_tokens = max_batch_tokens or limits[0]
        self.reuse_kv = reuse_kv
        self.kv_cache_bytes = int((kv_cache_mb or limits[1]) * 2**20)
        self._kv_checked: str | None = None     # why keys/values cannot be reused ("" when they can)
        self.pack = pack                        # segments sharing a past in one row (forward_slots)
        self._slots_checked: str | None = None  # why they cannot be ("" when they can)
        self._kv_token_bytes = 0
        self._kv_kept: OrderedDict = OrderedDict()   # id(batch) -> (weakref to it, bytes), oldest use first
        self.stats = {"forwards": 0, "computed_tokens": 0, "padded_tokens": 0}   # what really ran (benchmarks)
        self.p0 = None
        self.site: PromptSite | None = None     # where the prompt enters, resolved by set_init
        self.prefix_base = None                 # prefix: P0's keys and values [L, 2, m, kv_width]
        self._hidden = None                     # deep: this call's hidden-state offsets [pop, layers, m, D]
        self._deep_modules: tuple = ()          # deep: the decoder layers its offsets enter, looked up once
        self._info = ModelInfo(
            name=model, hidden_size=int(self.embedding.weight.shape[1]),
            embed_std=float(self.embedding.weight.float().std()), vocab_size=int(self.embedding.weight.shape[0]),
            gradients=True, max_batch=max(1, self.max_batch_tokens // 64),
            extra={"device": self.device, "dtype": dtype}, prompt_kinds=("soft", "text"),
            depths=("input", "deep", "prefix"))

    # -- protocol -------------------------------------------------------------------------------------------
    def info(self) -> ModelInfo:
        return self._info

    def set_init(self, init: PromptInit | None) -> None:
        """Resolve P0 here, where the embedding matrix is."""
        torch = self.torch
        if init is None:
            self.p0, self.site = None, None
            return
        weight = self.embedding.weight
        if init.kind == "zeros":
            self.p0 = torch.zeros(init.tokens, weight.shape[1], device=self.device, dtype=self.dtype)
        else:
            self.p0 = weight[torch.as_tensor(self._init_ids(init), device=self.device)].detach().clone()
        with torch.inference_mode(False), torch.no_grad():
            self.site = self._resolve_site(init)

    def _init_ids(self, init: PromptInit) -> np.ndarray:
        return init_token_ids(self.tokenizer, self.embedding.weight.shape[0], init)

    def _resolve_site(self, init: PromptInit) -> PromptSite:
        """Where the prompt enters, with the statistics a projection is scaled by, read off P0's own forward:
        a deep prompt's hidden states before each chosen layer, a prefix's keys and values at each layer."""
        m, width = self.p0.shape
        if init.depth == "input":
            return PromptSite("input", (), (m, width), (self._info.embed_std,))
        if init.depth == "deep":
            decoder = decoder_layers(self.model)
            layers = pick_layers(init.layers, len(decoder), "deep")
            self._deep_modules = tuple(decoder[l] for l in layers)
            states = self.model(inputs_embeds=self.p0[None], output_hidden_states=True).hidden_states
            # hidden_states[l] is what enters decoder layer l (hidden_states[0]: the embeddings)
            scales = (self._info.embed_std, *(robust_std(states[l][0]) for l in layers))
            return PromptSite("deep", layers, (1 + len(layers), m, width), scales)
        if init.depth != "prefix":
            raise ConfigError(f"unknown prompt depth {init.depth!r}; use input, deep or prefix")
        _, kv = forward_last(self.model, [self.p0], keep=True)
        self._kv_heads, head_dim = int(kv.keys[0].shape[1]), int(kv.keys[0].shape[3])
        base = self.torch.stack([self.torch.stack([k[0], v[0]]) for k, v in zip(kv.keys, kv.values)])
        base = base.transpose(2, 3).reshape(len(kv.keys), 2, m, self._kv_heads * head_dim)    # [L, 2, m, W]
        if init.kind == "zeros":    # the offsets will be the whole prefix (a saved one, say)
            base = self.torch.zeros_like(base)
        self.prefix_base = base
        layers = pick_layers(init.layers, len(kv.keys), "prefix")
        scales = tuple(robust_std(base[l]) or 1.0 for l in layers)
        return PromptSite("prefix", layers, (len(layers), 2, m, self._kv_heads * head_dim), scales, self._kv_heads)

    def prompt_site(self) -> PromptSite:
        if self.site is None:
            raise ConfigError("no initial prompt set; call set_init first")
        return self.site

    def encode(self, examples: list[Example], template: Template, label_words: list[str]) -> EncodedBatch:
        if not examples:
            raise ConfigError("cannot score an empty list of examples")
        generation = any(ex.targets for ex in examples)
        if generation and not all(ex.targets for ex in examples):
            raise ConfigError("some examples have reference answers and some do not; a batch is either "
                              "classification or generation")
        label_ids = [] if generation else label_token_ids(self.tokenizer, label_words)
        before, after, targets = [], [], []
        for ex in examples:
            b, a = self._render(ex, template)
            # Special tokens (a BOS, for tokenizers that add one) go on the first text piece, as PEFT does.
            before.append(self.tokenizer(b, add_special_tokens=True)["input_ids"] if b else [])
            after.append(self.tokenizer(a, add_special_tokens=not b)["input_ids"])
            if generation:
                targets.append(self.target_ids(ex.targets[0]))
                after[-1] = after[-1] + targets[-1]
        return EncodedBatch(before=before, after=after, label_ids=label_ids, examples=list(examples),
                            template=template, targets=targets if generation else None)

    def target_ids(self, text: str) -> list[int]:
        """A reference answer's token ids, closed by the end-of-sequence token (what generation stops at)."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ConfigError(f"reference answer {text!r} tokenizes to nothing; give every example a real answer")
        eos = self.tokenizer.eos_token_id
        return ids + ([eos] if eos is not None else [])

    def _render(self, ex: Example, template: Template) -> tuple[str, str]:
        """(text before the prompt, text after it). A chat example is rendered by the model's chat template,
        ready for the assistant's turn, with the prompt before it; without a chat template, as plain text."""
        if ex.chat is not None and getattr(self.tokenizer, "chat_template", None):
            msgs = [{"role": r, "content": c} for r, c in ex.chat]
            return "", self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return template.render(ex)

    def score(self, deltas: np.ndarray | TextPrompts | None, batch: EncodedBatch) -> ScoreResult:
        """Scores as :meth:`_score`. Out of GPU memory (other processes share the card, or the inputs are long),
        it drops the kept keys/values, halves the tokens per forward and the cache, and tries again: the same
        scores, in more and smaller forwards (seen with 12 study workers on one H200, each keeping ~15 GB)."""
        while True:
            try:
                return self._score(deltas, batch)
            except self.torch.cuda.OutOfMemoryError as e:
                if self.max_batch_tokens <= MIN_BATCH_TOKENS:
                    raise BackendError(f"out of memory on {self.device} even at {self.max_batch_tokens} tokens "
                                       f"per forward ({str(e).splitlines()[0]}); free the device (fewer study "
                                       "--workers on it) or score on another") from None
                self.close()
                self.torch.cuda.empty_cache()
                self.max_batch_tokens //= 2
                self.kv_cache_bytes //= 2
                log.warning("out of memory on %s: retrying with %d tokens per forward and %.0f MB of kept "
                            "keys/values", self.device, self.max_batch_tokens, self.kv_cache_bytes / 2**20)

    def _score(self, deltas: np.ndarray | TextPrompts | None, batch: EncodedBatch) -> ScoreResult:
        torch = self.torch
        with torch.inference_mode():
            if isinstance(deltas, TextPrompts):
                self._hidden = None
                lp, tokens = self._text_logprobs(deltas.texts, batch)
                return self._result(lp, tokens, batch)
            d = None if deltas is None else torch.as_tensor(np.asarray(deltas), device=self.device, dtype=self.dtype)
            prompts = self._prompts(d)
            lp = self._logprobs(prompts, batch, reuse=True)
        return self._result(lp, self._tokens(prompts, batch), batch)

    def _logprobs(self, prompts, batch: EncodedBatch, reuse: bool):
        """``[pop, n, C]`` for prompts as :meth:`_prompts` builds them: a prefix's keys/values run before each
        example; embedded prompts reuse kept keys/values where ``reuse`` allows, else run whole."""
        if isinstance(prompts, KV):
            return self._prefix_kv_logprobs(prompts, batch)
        if prompts is None and reuse and not batch.shared_head and min(len(a) for a in batch.after) > 0:
            # No prompt (the manual baseline): the kept keys/values of the text before the prompt's place serve
            # it too, as an empty prompt. With demonstrations that text is long: the baseline on DBpedia's test
            # set ran ~1,650 tokens an example uncached, where the kept head leaves each example's own ~100.
            prompts = self.torch.zeros(1, 0, self._info.hidden_size, dtype=self.dtype, device=self.device)
        lp = self._cached_logprobs(prompts, batch) if reuse and self._reuse_ok(prompts) else None
        return self._logprobs_uncached(prompts, batch) if lp is None else lp

    @staticmethod
    def _result(lp, tokens: int, batch: EncodedBatch) -> ScoreResult:
        lp = lp.float().cpu().numpy()
        if batch.targets is None:
            return ScoreResult(logprobs=lp, tokens=tokens)
        return ScoreResult(logprobs=lp[..., 0], tokens=tokens, target_tokens=np.array([len(t) for t in batch.targets]))

    def close(self) -> None:
        for ref, _ in self._kv_kept.values():
            if ref() is not None:
                ref().kv = None
        self._kv_kept.clear()

    # -- white-box extras -----------------------------------------------------------------------------------
    def logprobs_torch(self, deltas, batch: EncodedBatch):
        """Differentiable ``[pop, n, C]`` label log-probs (generation: ``[pop, n]`` target log-probs) and the
        tokens processed."""
        prompts = self._prompts(deltas.to(device=self.device, dtype=self.dtype))
        lp = self._logprobs(prompts, batch, reuse=False)
        return (lp if batch.targets is None else lp[..., 0]), self._tokens(prompts, batch)

    def prompt_matrix(self, delta: np.ndarray) -> np.ndarray:
        """The input-layer prompt P ``[m, D]`` for an offset in the site's shape (a prefix: the P0 its keys and
        values started from)."""
        if self.p0 is None:
            raise ConfigError("no initial prompt set; call set_init first")
        p0 = self.p0.float().cpu().numpy()
        delta = np.asarray(delta, dtype=np.float32)
        depth = self.prompt_site().depth
        return p0 if depth == "prefix" else (p0 + (delta[0] if depth == "deep" else delta)).astype(np.float32)

    def prompt_layers(self, delta: np.ndarray) -> dict[str, np.ndarray]:
        """What a deep or prefix prompt holds below the input layer, as :class:`bbpt.prompt.SavedPrompt` saves it:
        ``deep`` (offsets at each chosen layer) or ``prefix`` (every layer's keys and values); {} at the input."""
        site, delta = self.prompt_site(), np.asarray(delta, dtype=np.float32)
        if site.depth == "deep":
            return {"deep": delta[1:]}
        if site.depth == "prefix":
            full = self.prefix_base.float().cpu().numpy().copy()
            full[list(site.layers)] += delta
            return {"prefix": full}
        return {}

    def generate(self, delta: np.ndarray | None, examples: list[Example], template: Template, *,
                 max_new_tokens: int = 64, stop: list[str] | None = None, batch_size: int = 16,
                 use_cache: bool = True) -> list[str]:
        """Greedy answers to ``examples`` with the soft prompt P0 + ``delta`` (``[m, D]``; None: no prompt),
        placed where the template says. Rows run batched, left-padded with explicit positions, and each new
        token attends to the keys/values kept from the steps before (``use_cache=False`` recomputes the whole
        sequence every step: the reference the cached path is tested against). A row stops at the
        end-of-sequence token, at any of ``stop`` (cut off, not returned), or after ``max_new_tokens``."""
        rows = self.generate_rows(delta, examples, template, max_new_tokens=max_new_tokens, stop=stop,
                                  batch_size=batch_size, use_cache=use_cache)
        return [r["text"] for r in rows]

    def generate_rows(self, delta, examples: list[Example], template: Template, *, max_new_tokens: int = 64,
                      stop: list[str] | None = None, batch_size: int = 16, use_cache: bool = True) -> list[dict]:
        """:meth:`generate` with the details a server reports: per example ``text``, ``ids`` (the new tokens,
        the end-of-sequence token left out), ``finish`` ("stop" or "length") and ``prompt_tokens``."""
        torch = self.torch
        prompt = None if delta is None else self._prompts(torch.as_tensor(
            np.asarray(delta)[None], device=self.device, dtype=self.dtype))
        prompt = prompt if prompt is None or isinstance(prompt, KV) else prompt[0]    # a prefix stays a KV
        out: list[dict] = []
        with torch.inference_mode():
            for start in range(0, len(examples), batch_size):
                out += self._generate_rows(prompt, examples[start:start + batch_size], template, max_new_tokens,
                                           stop or [], use_cache)
        return out

    def _generate_rows(self, prompt, examples, template, max_new_tokens, stop, use_cache):
        torch = self.torch
        seqs, starts = [], []
        prefix = prompt.expand(len(examples)) if isinstance(prompt, KV) else None
        embedded = prompt if prefix is None else None
        for ex in examples:
            b, a = self._render(ex, template)
            pieces = [self.tokenizer(b, add_special_tokens=True)["input_ids"] if b else [],
                      self.tokenizer(a, add_special_tokens=not b)["input_ids"]]
            emb = [self.embedding(torch.tensor(ids, dtype=torch.long, device=self.device)) for ids in pieces]
            seqs.append(torch.cat([emb[0]] + ([embedded] if embedded is not None else []) + [emb[1]]))
            starts.append(len(pieces[0]))
        hidden = self._deep_rows([0] * len(seqs), starts)
        eos = self.tokenizer.eos_token_id
        new = [[] for _ in examples]
        done = [False] * len(examples)
        prompt_tokens = [int(s.shape[0]) for s in seqs]
        lp, kv = self._forward(seqs, prefix, keep=use_cache, hidden=hidden)
        for _ in range(max_new_tokens):
            nxt = lp.argmax(-1).tolist()
            for i, t in enumerate(nxt):
                if done[i]:
                    continue
                if t == eos:
                    done[i] = True
                    continue
                new[i].append(t)
                if stop and any(st in self.tokenizer.decode(new[i]) for st in stop):
                    done[i] = True
            if all(done):
                break
            step = self.embedding(torch.tensor(nxt, dtype=torch.long, device=self.device))[:, None]
            if use_cache:
                lp, kv = self._forward(list(step), kv, keep=True)
            else:
                seqs = [torch.cat([s, e]) for s, e in zip(seqs, step)]
                lp, _ = self._forward(seqs, prefix, hidden=hidden)
        return [dict(text=_cut(self.tokenizer.decode(ids, skip_special_tokens=True), stop), ids=ids,
                     finish="stop" if d else "length", prompt_tokens=n)
                for ids, d, n in zip(new, done, prompt_tokens)]

    # -- internals ------------------------------------------------------------------------------------------
    def _prompts(self, deltas):
        """P0 + ΔP as ``[pop, m, D]`` (a deep prompt's hidden-state offsets kept aside for this call), a
        prefix's keys and values as a :class:`KV` of ``pop`` rows, or None for scoring without a prompt."""
        self._hidden = None
        if deltas is None:
            return None
        if self.p0 is None:
            raise ConfigError("no initial prompt set; call set_init first")
        site = self.prompt_site()
        if deltas.dim() != len(site.shape) + 1 or tuple(deltas.shape[1:]) != site.shape:
            raise ConfigError(f"prompt offsets have shape {tuple(deltas.shape)}, expected (pop, "
                              f"{', '.join(map(str, site.shape))}) for a {site.depth} prompt")
        if site.depth == "prefix":
            return self._prefix_kv(deltas)
        if site.depth == "deep":
            self._hidden, deltas = deltas[:, 1:], deltas[:, 0]
        return self.p0.unsqueeze(0) + deltas

    def _prefix_kv(self, deltas) -> KV:
        """Each candidate's keys and values: P0's, plus its offsets at the chosen layers (differentiable)."""
        torch, site = self.torch, self.site
        pop, (n_layers, _, m, width) = deltas.shape[0], self.prefix_base.shape
        offsets = deltas.new_zeros(pop, n_layers, 2, m, width)
        offsets[:, list(site.layers)] = deltas
        full = self.prefix_base.unsqueeze(0) + offsets
        heads = self._kv_heads

        def per_layer(l: int, kind: int):         # [pop, m, W] -> [pop, kv_heads, m, head_dim], the cache's layout
            return full[:, l, kind].reshape(pop, m, heads, width // heads).transpose(1, 2)

        mask = torch.ones(pop, m, dtype=torch.long, device=self.device)
        return KV([per_layer(l, 0) for l in range(n_layers)], [per_layer(l, 1) for l in range(n_layers)], mask,
                  mask.sum(-1))

    def _deep_rows(self, cands: list[int], starts: list[int]):
        """The ``hidden`` argument of a forward whose rows are these candidates' sequences, each with its
        prompt at ``starts``; None when this call's prompt has no deep part."""
        if self._hidden is None:
            return None
        idx = self.torch.tensor(cands, device=self.device)
        return self._deep_modules, self._hidden[idx], starts

    @staticmethod
    def _tokens(prompts, batch: EncodedBatch) -> int:
        # The tokens of the sequences scored, whichever of them were recomputed: the same count a remote
        # backend bills, so calls compare across backends and placements (``stats`` has what really ran).
        # A prefix's m virtual tokens count as the input prompt's m tokens do.
        if isinstance(prompts, KV):
            pop, m = prompts.mask.shape
        else:
            m = 0 if prompts is None else prompts.shape[1]
            pop = 1 if prompts is None else prompts.shape[0]
        return sum(len(b) + m + len(a) for b, a in zip(batch.before, batch.after)) * pop

    def _example_embeds(self, batch: EncodedBatch):
        torch = self.torch
        if batch.embeds is None:
            # Outside inference mode, so the backprop path may also use these tensors.
            with torch.inference_mode(False), torch.no_grad():
                batch.embeds = [
                    (self.embedding(torch.tensor(b, dtype=torch.long, device=self.device)),
                     self.embedding(torch.tensor(a, dtype=torch.long, device=self.device)))
                    for b, a in zip(batch.before, batch.after)]
        return batch.embeds

    def _forward(self, seqs, past: KV | None = None, keep: bool = False, targets=None, hidden=None):
        self.stats["forwards"] += 1
        self.stats["computed_tokens"] += sum(int(s.shape[0]) for s in seqs)
        self.stats["padded_tokens"] += len(seqs) * max(int(s.shape[0]) for s in seqs)
        return forward_last(self.model, seqs, past, keep, targets, hidden)

    def _chunks(self, new_lens: list[int], past_lens: list[int] | None = None):
        return plan_chunks(new_lens, self.max_batch_tokens, past_lens)

    def _logprobs_uncached(self, prompts, batch: EncodedBatch):
        """Label log-probs ``[pop, n, C]`` from whole-sequence forwards (differentiable if ``prompts`` is)."""
        torch = self.torch
        plist = [None] if prompts is None else list(prompts)
        m = 0 if prompts is None else prompts.shape[1]
        embeds = self._example_embeds(batch)
        lengths = [len(b) + m + len(a) for b, a in zip(batch.before, batch.after)]
        return self._batched(len(plist), batch, lambda c, j: lengths[j], lambda c, j: torch.cat(
            [embeds[j][0]] + ([plist[c]] if plist[c] is not None else []) + [embeds[j][1]]),
            start=lambda c, j: len(batch.before[j]))

    def _text_logprobs(self, texts, batch: EncodedBatch):
        """Discrete prompts: each (prompt, example) text tokenized whole, as a text API would see it."""
        if batch.examples is None:
            raise ConfigError("this batch was encoded without its examples; encode it again to score text prompts")
        ids = [[self.tokenizer(batch.template.render_text_prompt(ex, t), add_special_tokens=True)["input_ids"]
                + (batch.targets[j] if batch.targets is not None else [])
                for j, ex in enumerate(batch.examples)] for t in texts]
        lp = self._batched(len(texts), batch, lambda c, j: len(ids[c][j]), lambda c, j: self.embedding(
            self.torch.tensor(ids[c][j], dtype=self.torch.long, device=self.device)))
        return lp, sum(len(i) for row in ids for i in row)

    def _batched(self, pop: int, batch: EncodedBatch, length, sequence, start=None):
        """Label log-probs ``[pop, n, C]`` of every (candidate, example) sequence, run whole, in chunks of
        similar length under the token budget; ``start(c, j)`` is where the prompt begins in a sequence."""
        torch = self.torch
        pairs = sorted(((c, j) for j in range(batch.n) for c in range(pop)), key=lambda p: length(*p))
        rows = []
        for lo, hi in self._chunks([length(c, j) for c, j in pairs]):
            chunk = pairs[lo:hi]
            starts = None if start is None else [start(c, j) for c, j in chunk]
            rows.append(self._read([sequence(c, j) for c, j in chunk], None, batch, chunk, starts))
        return self._scatter(torch.cat(rows), pairs, pop, batch)

    def _read(self, seqs, past, batch: EncodedBatch, pairs, starts=None):
        """What a batch scores, for rows ``pairs`` (candidate, example): the label words' log-probs at the
        last position ``[B, C]``, or for generation each row's target log-prob ``[B, 1]``. ``starts``: where
        each row's prompt begins among its new tokens (for a deep prompt's offsets), None if it has none."""
        hidden = None if starts is None else self._deep_rows([c for c, _ in pairs], starts)
        if batch.targets is None:
            return self._forward(seqs, past, hidden=hidden)[0][:, self.torch.tensor(batch.label_ids,
                                                                                    device=self.device)]
        return self._forward(seqs, past, targets=[batch.targets[j] for _, j in pairs], hidden=hidden)[0]

    def _scatter(self, flat, pairs, pop: int, batch: EncodedBatch):
        torch = self.torch
        out = flat.new_zeros(pop, batch.n, flat.shape[-1])
        out[torch.tensor([c for c, _ in pairs]), torch.tensor([j for _, j in pairs])] = flat
        return out

    # -- reusing keys/values (black-box only) ---------------------------------------------------------------
    def _reuse_ok(self, prompts) -> bool:
        if prompts is None or not self.reuse_kv:
            return False
        if self._kv_checked is None:
            self._kv_checked, self._kv_token_bytes = reuse_works(self.model, self._info.hidden_size, self.dtype,
                                                                 self.device)
            if self._kv_checked:
                log.warning("keys/values of %s cannot be reused (%s); every call recomputes whole sequences",
                            self.name, self._kv_checked)
        return not self._kv_checked

    def _cached_logprobs(self, prompts, batch: EncodedBatch):
        """``[pop, n, C]`` reusing keys/values, or None when the batch's cache would not fit the budget."""
        embeds = self._example_embeds(batch)
        if batch.shared_head:
            return self._prefix_logprobs(prompts, batch, embeds)
        kv = self._kept_kv(batch, embeds)
        head_only = isinstance(kv, SharedKV) and kv.tail is None
        if prompts.shape[0] > 1 and (kv is None or head_only):
            # Too big to keep: a population still encodes each example's own text once (not once per candidate).
            return self._grouped_logprobs(prompts, batch, embeds, kv.head if head_only else None)
        return None if kv is None else self._infix_logprobs(prompts, batch, embeds, kv)

    def _grouped_logprobs(self, prompts, batch: EncodedBatch, embeds, head: KV | None):
        """``[pop, n, C]`` for a population on a batch whose keys/values are over the budget to keep (a test set
        of long inputs, a big training set), whole or after the kept shared ``head``: the examples go in groups
        whose keys/values fit a quarter of the budget, and each group's text before the prompt (after the head)
        is encoded once for the whole population and dropped after. Otherwise each example's text would run once
        per candidate (a study's test curve: once per prompt)."""
        torch = self.torch
        h = 0 if head is None else int(head.mask.shape[1])
        lens = [len(b) - h for b in batch.before]
        order = sorted(range(batch.n), key=lens.__getitem__)
        cap, groups = self.kv_cache_bytes // 4, [[]]
        for j in order:         # ascending lengths: a group's width is its last example's
            if groups[-1] and (len(groups[-1]) + 1) * lens[j] * self._kv_token_bytes > cap:
                groups.append([])
            groups[-1].append(j)
        parts = []
        for g in groups:
            sub = EncodedBatch([batch.before[j] for j in g], [batch.after[j] for j in g], batch.label_ids,
                               embeds=[embeds[j] for j in g],
                               targets=None if batch.targets is None else [batch.targets[j] for j in g])
            own = self._build_kv([embeds[j][0][h:] for j in g], lens[g[-1]], head)
            parts.append(self._infix_logprobs(prompts, sub, sub.embeds, own if head is None else SharedKV(head, own)))
        flat = torch.cat(parts, dim=1)
        out = torch.empty_like(flat)
        out[:, torch.tensor([j for g in groups for j in g], device=out.device)] = flat
        return out

    def _prefix_logprobs(self, prompts, batch: EncodedBatch, embeds):
        torch = self.torch
        head = self._kept_kv(batch, embeds) if batch.before[0] else None
        if batch.before[0] and head is None:
            return None
        pop, m = prompts.shape[:2]
        after_lens = [len(a) for a in batch.after]
        order = sorted(range(batch.n), key=after_lens.__getitem__)
        # Candidates go in groups whose prompt keys/values fit a quarter of the budget (the whole population
        # unless it is large): the prompt runs once per candidate, its keys/values serve all n examples.
        per_cand = max(1, (len(batch.before[0]) + m) * self._kv_token_bytes)
        group = max(1, min(pop, self.kv_cache_bytes // 4 // per_cand, self.max_batch_tokens // m))
        rows, pairs = [], []
        for g0 in range(0, pop, group):
            cands = range(g0, min(pop, g0 + group))
            _, pkv = self._forward(list(prompts[g0:cands.stop]), head.expand(len(cands)) if head else None,
                                   keep=True, hidden=self._deep_rows(list(cands), [0] * len(cands)))
            gpairs = [(c, j) for j in order for c in cands]
            for start, end in self._chunks([after_lens[j] for _, j in gpairs], [pkv.mask.shape[1]] * len(gpairs)):
                chunk = gpairs[start:end]
                past = pkv.take(torch.tensor([c - g0 for c, _ in chunk], device=self.device))
                rows.append(self._read([embeds[j][1] for _, j in chunk], past, batch, chunk))
            pairs += gpairs
        return self._scatter(torch.cat(rows), pairs, pop, batch)

    def _infix_logprobs(self, prompts, batch: EncodedBatch, embeds, kv: KV | SharedKV):
        torch = self.torch
        pop, m = prompts.shape[:2]
        # Each example's tokens before the prompt that ``kv`` does not hold run with the call, before the prompt
        # (none, unless only a shared head was kept).
        kept = kv.head_len if isinstance(kv, SharedKV) and kv.tail is None else None
        own = [0 if kept is None else len(b) - kept for b in batch.before]
        new_lens = [own[j] + m + len(a) for j, a in enumerate(batch.after)]
        past_lens = [len(b) - own[j] for j, b in enumerate(batch.before)]
        if batch.targets is None and self._slots_ok():
            return self._infix_slots(prompts, batch, embeds, kv, new_lens, past_lens, own)
        order = sorted(range(batch.n), key=lambda j: (new_lens[j], past_lens[j]))
        pairs = [(c, j) for j in order for c in range(pop)]
        rows = []
        for start, end in self._chunks([new_lens[j] for _, j in pairs], [past_lens[j] for _, j in pairs]):
            chunk = pairs[start:end]
            past = kv.take(torch.tensor([j for _, j in chunk], device=self.device))
            seqs = [torch.cat([embeds[j][0][past_lens[j]:], prompts[c], embeds[j][1]]) for c, j in chunk]
            rows.append(self._read(seqs, past, batch, chunk, [own[j] for _, j in chunk]))
        return self._scatter(torch.cat(rows), pairs, pop, batch)

    def _infix_slots(self, prompts, batch: EncodedBatch, embeds, kv: KV | SharedKV, new_lens, past_lens, own):
        """:meth:`_infix_logprobs` with the (candidate, example) sequences that share a past packed as segments
        of one row (:func:`forward_slots`): when only the shared head is kept, rows of many segments after it;
        otherwise a row per example holding its candidates. The same scores, with each past copied once per row
        rather than once per segment (a 10-candidate call on DBpedia after demonstrations: 1.65x faster,
        benchmarks/packing.py). A deep prompt's offsets go to each segment's prompt, ``own[j]`` tokens in (the
        example's text that the kept past does not hold)."""
        torch, pop = self.torch, prompts.shape[0]
        label_ids = torch.tensor(batch.label_ids, device=self.device)

        def seq(c: int, j: int):
            return torch.cat([embeds[j][0][past_lens[j]:], prompts[c], embeds[j][1]])

        shared = isinstance(kv, SharedKV) and kv.tail is None
        if shared:          # one past for every pair (the demonstrations' head): a row of many pairs after it
            pairs = sorted(((c, j) for j in range(batch.n) for c in range(pop)), key=lambda p: new_lens[p[1]])
            lens = [new_lens[j] for _, j in pairs]
            forwards = [[pairs[lo:hi]] for lo, hi in plan_chunks(lens, min(self.max_batch_tokens, PACKED_ROW))]
        else:               # a past per example: a row per example holds its candidates, k at a time
            k = min(pop, max(1, self.max_batch_tokens // max(new_lens)))
            order = sorted(range(batch.n), key=lambda j: (new_lens[j], past_lens[j]))
            units = [[(c, j) for c in range(g, min(pop, g + k))] for j in order for g in range(0, pop, k)]
            plan = self._chunks([k * new_lens[u[0][1]] for u in units], [past_lens[u[0][1]] for u in units])
            forwards = [units[lo:hi] for lo, hi in plan]
        flat, done = [], []
        for rows in forwards:
            past = kv.head if shared else kv.take(torch.tensor([r[0][1] for r in rows], device=self.device))
            segs = [[seq(c, j) for c, j in r] for r in rows]
            lens = [int(x.shape[0]) for r in segs for x in r]
            self.stats["forwards"] += 1
            self.stats["computed_tokens"] += sum(lens)
            self.stats["padded_tokens"] += len(segs) * max(map(len, segs)) * max(lens)
            flat_pairs = [p for r in rows for p in r]
            hidden = self._deep_rows([c for c, _ in flat_pairs], [own[j] for _, j in flat_pairs])
            lp = forward_slots(self.model, segs, past, hidden)[..., label_ids]  # [rows, K, C]
            for i, r in enumerate(rows):
                flat.append(lp[i, :len(r)])
                done += r
        return self._scatter(torch.cat(flat), done, pop, batch)

    def _slots_ok(self) -> bool:
        if not self.pack:
            return False
        if self._slots_checked is None:
            self._slots_checked = slots_work(self.model, self._info.hidden_size, self.dtype, self.device)
            if self._slots_checked:
                log.warning("%s cannot score packed segments (%s); each candidate runs in a row of its own",
                            self.name, self._slots_checked)
        return not self._slots_checked

    def _prefix_kv_logprobs(self, kv: KV, batch: EncodedBatch):
        """``[pop, n, C]`` for prefix prompts: each example's tokens run after its candidate's keys and values
        (the same path with and without gradients: there is nothing before the prefix to reuse)."""
        torch = self.torch
        embeds = self._example_embeds(batch)
        lengths = [len(b) + len(a) for b, a in zip(batch.before, batch.after)]
        pairs = sorted(((c, j) for j in range(batch.n) for c in range(kv.mask.shape[0])), key=lambda p: lengths[p[1]])
        rows = []
        for lo, hi in self._chunks([lengths[j] for _, j in pairs], [kv.mask.shape[1]] * len(pairs)):
            chunk = pairs[lo:hi]
            past = kv.take(torch.tensor([c for c, _ in chunk], device=self.device))
            rows.append(self._read([torch.cat([embeds[j][0], embeds[j][1]]) for _, j in chunk], past, batch, chunk))
        return self._scatter(torch.cat(rows), pairs, kv.mask.shape[0], batch)

    def _kept_kv(self, batch: EncodedBatch, embeds) -> KV | SharedKV | None:
        """The batch's keys/values of the text before the prompt: built once, kept within ``kv_cache_mb``.
        Whole rows when they fit. Otherwise a long run of tokens every example starts with (demonstrations) is
        kept once, as a :class:`SharedKV` (on SST-2 with demonstrations a call took 0.73 s so, 0.61 s with whole
        rows; on AG News, whose whole rows do not fit, 2.1 s against 23 s uncached: benchmarks/demos.py); if
        the examples' own tokens do not fit beside it, the shared head alone is kept."""
        key = id(batch)
        if batch.kv is not None and key in self._kv_kept:
            self._kv_kept.move_to_end(key)
            return batch.kv
        heads, h, width = self.kv_plan(batch)
        if len(heads) * (h + width) * self._kv_token_bytes <= self.kv_cache_bytes:
            h, width = 0, h + width     # whole rows fit: a call is faster without joining head and tail
        need = (h + len(heads) * width) * self._kv_token_bytes
        keep_tail = need <= self.kv_cache_bytes
        if not keep_tail:
            if not h or h * self._kv_token_bytes > self.kv_cache_bytes:
                log.info("keys/values of %d examples need %.0f MB, over kv_cache_mb=%.0f: scoring them uncached",
                         len(heads), need / 2**20, self.kv_cache_bytes / 2**20)
                return None
            log.info("keys/values of %d examples need %.0f MB, over kv_cache_mb=%.0f: keeping only the %d tokens "
                     "they all start with", len(heads), need / 2**20, self.kv_cache_bytes / 2**20, h)
            need = h * self._kv_token_bytes
        while self._kv_kept and sum(b for _, b in self._kv_kept.values()) + need > self.kv_cache_bytes:
            _, (ref, _) = self._kv_kept.popitem(last=False)
            if ref() is not None:
                ref().kv = None
        if h:
            head = self._build_kv([embeds[0][0][:h]], h)
            tail = self._build_kv([embeds[j][0][h:] for j in heads], width, head) if keep_tail else None
            batch.kv = SharedKV(head, tail)
        else:
            batch.kv = self._build_kv([embeds[j][0] for j in heads], width)
        # A dead batch takes its entry with it, so the bookkeeping never outgrows the batches alive.
        self._kv_kept[key] = (weakref.ref(batch, lambda _, k=key, kept=self._kv_kept: kept.pop(k, None)),
                              batch.kv.nbytes)
        return batch.kv

    @staticmethod
    def kv_plan(batch: EncodedBatch) -> tuple[list[int], int, int]:
        """What keeping the batch's text before the prompt takes, in tokens: the rows kept (one when every
        example shares that text: prefix placement), the length of the head they share (0 when under
        :data:`SHARED_HEAD_MIN`), and each row's width after it (left-padded to the longest)."""
        heads = [0] if batch.shared_head else list(range(batch.n))
        h = 0 if batch.shared_head else common_head(batch.before)
        h = h if h >= SHARED_HEAD_MIN else 0
        return heads, h, max(len(batch.before[j]) for j in heads) - h

    def _build_kv(self, seqs, width: int, head: KV | None = None) -> KV:
        """Keys/values of ``seqs``, stored left-padded to ``width`` in one tensor per layer (row i = seqs[i]);
        after ``head`` (one row every sequence continues), whose own columns are left out of what is stored."""
        torch = self.torch
        lens = [int(s.shape[0]) for s in seqs]
        order = sorted(range(len(seqs)), key=lens.__getitem__)
        skip = 0 if head is None else int(head.mask.shape[1])
        kv = None
        for start, end in self._chunks([lens[i] for i in order], None if head is None else [skip] * len(order)):
            idx = order[start:end]
            _, part = self._forward([seqs[i] for i in idx], None if head is None else head.expand(len(idx)),
                                    keep=True)
            if kv is None:
                def blank(t):
                    return t.new_zeros(len(seqs), t.shape[1], width, t.shape[3])
                kv = KV([blank(k) for k in part.keys], [blank(v) for v in part.values],
                        torch.zeros(len(seqs), width, dtype=torch.long, device=self.device),
                        torch.zeros(len(seqs), dtype=torch.long, device=self.device))
            rows, cols = torch.tensor(idx, device=self.device), slice(width - part.mask.shape[1] + skip, None)
            for dst, src in zip((*kv.keys, *kv.values), (*part.keys, *part.values)):
                dst[rows, :, cols] = src[:, :, skip:]
            kv.mask[rows, cols] = part.mask[:, skip:]
            kv.lengths[rows] = part.lengths - skip
        return kv


def _cut(text: str, stop: list[str]) -> str:
    """``text`` up to the first stop string (which is not part of the answer)."""
    cuts = [text.index(st) for st in stop if st in text]
    return text[:min(cuts)] if cuts else text


def plan_chunks(lens: list[int], budget: int, past: list[int] | None = None, overhead: int = 64):
    """Cut rows sorted by length (ascending) into forwards, as ``(start, end)`` ranges.

    Each forward pads its rows to its longest, so where the cuts go decides how many padding tokens are
    computed. A greedy fill of ``budget`` tokens mixes short and long rows (36 % padding measured on SST-2 with
    a prefix cache); this dynamic programme minimises padded tokens plus ``overhead`` tokens per forward (the
    fixed cost of a forward: dispatch, and the LM head's weight read), with at most ``budget`` padded new
    tokens per forward, and at most four times that counting ``past`` tokens (bounds the attention and the
    cache copies). A row longer than the budget goes alone.
    """
    n = len(lens)
    length = np.asarray(lens, dtype=np.int64)
    prior = np.zeros(n, np.int64) if past is None else np.asarray(past, dtype=np.int64)
    cost = np.zeros(n + 1)
    back = np.zeros(n + 1, np.int64)
    for end in range(1, n + 1):
        longest = max(1, int(length[end - 1]))           # sorted: the last row is the chunk's longest
        lo = max(0, end - max(1, budget // longest))
        rows = end - np.arange(lo, end)
        past_max = np.maximum.accumulate(prior[lo:end][::-1])[::-1]
        c = cost[lo:end] + rows * longest + overhead
        c[(rows * (longest + past_max) > 4 * budget) & (rows > 1)] = np.inf
        best = int(np.argmin(c))
        cost[end], back[end] = c[best], lo + best
    cuts, end = [], n
    while end > 0:
        cuts.append((int(back[end]), end))
        end = int(back[end])
    return cuts[::-1]


def init_token_ids(tokenizer, vocab_size: int, init: PromptInit) -> np.ndarray:
    """The token ids whose embeddings are P0 (kinds vocab, text and labels; zeros has none)."""
    if init.kind == "vocab":
        rng = np.random.default_rng(init.seed)
        return rng.choice(min(VOCAB_INIT_RANGE, vocab_size), size=init.tokens, replace=False)
    # text and labels: embeddings of the words, repeated to fill m rows (as PEFT's TEXT init does)
    ids = tokenizer(init.text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError(f"--init {init.spec()!r} tokenizes to nothing; give some words")
    return np.asarray((ids * (init.tokens // len(ids) + 1))[: init.tokens])


def label_token_ids(tokenizer, label_words: list[str]) -> list[int]:
    """First token of each label word; they must differ, or two classes would be scored as one."""
    ids = []
    for w in label_words:
        toks = tokenizer(w, add_special_tokens=False)["input_ids"]
        if not toks:
            raise ConfigError(f"label word {w!r} tokenizes to nothing; give a real word, e.g. ' positive'")
        ids.append(toks[0])
    seen: dict[int, str] = {}
    for w, i in zip(label_words, ids):
        if i in seen:
            piece = tokenizer.convert_ids_to_tokens(i)
            raise ConfigError(f"label words {seen[i]!r} and {w!r} start with the same token {piece!r}; "
                              "pick label words whose first tokens differ (e.g. ' good' vs ' bad')")
        seen[i] = w
    return ids
