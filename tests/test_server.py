"""``bbpt serve`` as a real subprocess on loopback: routes, auth, size limit, bad input, and the numbers."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import zipfile

import httpx
import numpy as np
import pytest
import torch

from bbpt.prompt import PromptInit, SavedPrompt
from bbpt.wire import encode_array, encode_embeds
from bbpt.tasks import Example, Template
from serve_helpers import ServerProcess

KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}
TEMPLATE = "Review: {text}\nSentiment:"
LABELS = [" negative", " positive"]
TEXTS = ["a gorgeous, witty film", "dull and far too long", "fine"]
INIT = {"kind": "text", "tokens": 4, "text": "Classify the review."}


def _score_body(offsets: np.ndarray, dtype: str = "float32", **over) -> dict:
    body = dict(init=INIT, deltas=encode_array(offsets, dtype), examples=[{"text": t} for t in TEXTS],
                template=TEMPLATE, label_words=LABELS)
    body.update(over)
    return body


def _local(backend, deltas, init=PromptInit("text", 4, 0, "Classify the review."), texts=TEXTS,
           template=TEMPLATE, labels=LABELS):
    backend.set_init(init)
    batch = backend.encode([Example(t, 0) for t in texts], Template(template), labels)
    return backend.score(deltas, batch)


@pytest.fixture(scope="module")
def prompts_dir(tmp_path_factory):
    """Two saved prompts: one holding P itself (local tuning), one holding ΔP from P0 (remote tuning)."""
    root = tmp_path_factory.mktemp("runs")
    rng = np.random.default_rng(1)
    meta = dict(template=TEMPLATE, label_words=LABELS, label_names=["negative", "positive"], tokens=4, task="sst2")
    SavedPrompt(rng.standard_normal((4, 32)).astype(np.float32) * 0.02, {**meta, "prompt_is": "P0 + delta"}
                ).save(root / "sst2-full")
    SavedPrompt(rng.standard_normal((4, 32)).astype(np.float32) * 0.02,
                {**meta, "prompt_is": "delta (P0 at the backend)", "init": "text:Classify the review.",
                 "config": {"seed": 0}}).save(root / "sst2-delta")
    SavedPrompt(rng.standard_normal((4, 32)).astype(np.float32) * 2.0,
                dict(template="Data: {text}\nText:", label_words=[], label_names=[], tokens=4, task="e2e",
                     prompt_is="P0 + delta", kind="generation", stop=["\n"])).save(root / "e2e-gen")
    return root


@pytest.fixture(scope="module")
def server(tiny_model_dir, prompts_dir, tmp_path_factory):
    s = ServerProcess(tiny_model_dir, tmp_path_factory.mktemp("logs"), "--api-key", KEY, "--max-body-mb", "1",
                      "--max-candidates", "8", "--max-examples", "40", "--prompts", str(prompts_dir)).start()
    yield s
    s.stop()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


def test_health_is_open_and_models_describe_without_weights(server, client):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    card = client.get("/v1/models").json()["data"][0]
    assert card["hidden_size"] == 32 and card["vocab_size"] > 1000 and card["embed_std"] > 0
    assert card["depths"] == ["input", "deep", "prefix"]       # the server builds layer prompts itself
    assert set(card) == {"id", "object", "owned_by", "hidden_size", "depths", "embed_std", "vocab_size",
                         "max_model_len", "limits", "prompts"}
    assert card["prompts"] == ["e2e-gen", "sst2-delta", "sst2-full"]


@pytest.mark.parametrize("path", ["/v1/models", "/v1/score", "/v1/completions", "/v1/classify", "/v1/prompts"])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_every_route_but_health_needs_the_key(server, path, headers):
    method = "GET" if path in ("/v1/models", "/v1/prompts") else "POST"
    r = httpx.request(method, server.url + path, headers=headers, json={})
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert "API key" in r.json()["error"]["message"]


def test_score_equals_local_backend(client, tiny_backend):
    deltas = np.random.default_rng(0).standard_normal((5, 4, 32)).astype(np.float32) * 0.05
    r = client.post("/v1/score", json=_score_body(deltas))
    assert r.status_code == 200, r.text
    ref = _local(tiny_backend, deltas)
    assert np.abs(np.asarray(r.json()["logprobs"]) - ref.logprobs).max() < 1e-5
    assert r.json()["usage"] == {"prompt_tokens": ref.tokens, "candidates": 5, "examples": 3}
    # float16 on the wire: the server scores exactly the rounded offsets
    r16 = client.post("/v1/score", json=_score_body(deltas, "float16"))
    ref16 = _local(tiny_backend, deltas.astype(np.float16).astype(np.float32))
    assert np.abs(np.asarray(r16.json()["logprobs"]) - ref16.logprobs).max() < 1e-5
    # no prompt at all: the manual-template baseline
    r0 = client.post("/v1/score", json=dict(examples=[{"text": t} for t in TEXTS], template=TEMPLATE,
                                            label_words=LABELS))
    assert np.abs(np.asarray(r0.json()["logprobs"]) - _local(tiny_backend, None).logprobs).max() < 1e-5


def test_over_the_size_limit_is_413_and_the_server_goes_on(server, client):
    big = np.zeros((8, 4, 32 * 300), np.float32)        # ~1.6 MB of base64, over the 1 MiB limit
    r = client.post("/v1/score", json=_score_body(big))
    assert r.status_code == 413
    assert "limit" in r.json()["error"]["message"]
    chunked = httpx.post(server.url + "/v1/score", headers=AUTH, content=iter([b"x" * 2**19] * 3))
    assert chunked.status_code == 413
    assert client.get("/health").status_code == 200


class _Evil:
    """Unpickling this would run a command; torch.load(weights_only=True) must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _saved(obj) -> str:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return _b64(buf.getvalue())


def _deflated_archive() -> str:
    """A torch.save archive re-zipped with compression: the zip-bomb guard refuses it before torch reads it."""
    src = zipfile.ZipFile(io.BytesIO(base64.b64decode(encode_embeds(torch.zeros(3, 32)))))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for m in src.infolist():
            z.writestr(m.filename, src.read(m))
    return _b64(out.getvalue())


GOOD = np.zeros((2, 4, 32), np.float32)
ARR = encode_array(GOOD)
BAD_SCORE = {
    "no examples": _score_body(GOOD, examples=[]),
    "unknown field": {**_score_body(GOOD), "temperature": 1},
    "examples not a list": _score_body(GOOD, examples="great"),
    "bad base64": _score_body(GOOD, deltas={**ARR, "data": "%%%not-base64"}),
    "short data": _score_body(GOOD, deltas={**ARR, "shape": [3, 4, 32]}),
    "2-D shape": _score_body(GOOD, deltas={**ARR, "shape": [8, 32]}),
    "wrong width": _score_body(np.zeros((2, 4, 16), np.float32)),
    "rows differ from init": _score_body(np.zeros((2, 5, 32), np.float32)),
    "float64": _score_body(GOOD, deltas={**encode_array(np.zeros((1, 4, 32))), "dtype": "float64"}),
    "negative shape": _score_body(GOOD, deltas={**ARR, "shape": [-2, 4, 32]}),
    "NaN": _score_body(np.full((2, 4, 32), np.nan, np.float32)),
    "inf": _score_body(np.full((2, 4, 32), np.inf, np.float32)),
    "too many candidates": _score_body(np.zeros((9, 4, 32), np.float32)),
    "too many examples": _score_body(GOOD, examples=[{"text": "x"}] * 41),
    "deltas without init": {k: v for k, v in _score_body(GOOD).items() if k != "init"},
    "unknown init kind": _score_body(GOOD, init={**INIT, "kind": "magic"}),
    "zero init tokens": _score_body(GOOD, init={**INIT, "tokens": 0}),
    "text init without text": _score_body(GOOD, init={**INIT, "text": " "}),
    "template without text": _score_body(GOOD, template="Sentiment:"),
    "template with bad field": _score_body(GOOD, template="{text} {oops}"),
    "pair template, no pair": _score_body(GOOD, template="{text} / {text_pair}:"),
    "labels share a token": _score_body(GOOD, label_words=[" positive", " positive"]),
    "empty label word": _score_body(GOOD, label_words=["", " positive"]),
    "unknown model": _score_body(GOOD, model="gpt-17"),
}


def _embeds_body(embeds, **over) -> dict:
    return {"prompt_embeds": embeds, "max_tokens": 1, "logprobs": 2, **over}


BAD_COMPLETIONS = {
    "not base64": _embeds_body("@@@"),
    "raw bytes, not an archive": _embeds_body(_b64(b"\x00" * 64)),
    "compressed archive": _embeds_body(_deflated_archive()),
    "a dict, not a tensor": _embeds_body(_saved({"a": torch.zeros(2, 32)})),
    "1-D": _embeds_body(encode_embeds(torch.zeros(32))),
    "wrong width": _embeds_body(encode_embeds(torch.zeros(3, 31))),
    "integers": _embeds_body(encode_embeds(torch.zeros(3, 32, dtype=torch.int64))),
    "NaN": _embeds_body(encode_embeds(torch.full((3, 32), float("nan")))),
    "empty": _embeds_body(encode_embeds(torch.zeros(0, 32))),
    "too long": _embeds_body(encode_embeds(torch.zeros(600, 32))),
    "sparse": _embeds_body(_saved(torch.zeros(3, 32).to_sparse())),
    "too many logprobs": _embeds_body(encode_embeds(torch.zeros(3, 32)), logprobs=21),
    "negative max_tokens": _embeds_body(encode_embeds(torch.zeros(3, 32)), max_tokens=-1),
    "stream": _embeds_body(encode_embeds(torch.zeros(3, 32)), stream=True),
    "n=2": _embeds_body(encode_embeds(torch.zeros(3, 32)), n=2),
    "echo": _embeds_body(encode_embeds(torch.zeros(3, 32)), echo=True),
    "token ids out of range": _embeds_body(encode_embeds(torch.zeros(3, 32)), logprob_token_ids=[10**9]),
    "nothing to complete": {"max_tokens": 1},
}


@pytest.mark.parametrize("body", list(BAD_SCORE.values()), ids=list(BAD_SCORE))
def test_bad_score_requests_are_4xx_and_the_server_goes_on(client, body):
    r = client.post("/v1/score", json=body)
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["message"]
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("body", list(BAD_COMPLETIONS.values()), ids=list(BAD_COMPLETIONS))
def test_bad_completion_requests_are_4xx_and_the_server_goes_on(client, body):
    r = client.post("/v1/completions", json=body)
    assert 400 <= r.status_code < 500, r.text
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("raw,ctype", [(b"{not json", "application/json"), (b"\xff\xfe", "application/json"),
                                       (b"[1, 2]", "application/json"), (b"text=hi", "text/plain")])
def test_unparseable_bodies_are_400(client, raw, ctype):
    r = client.post("/v1/score", content=raw, headers={"Content-Type": ctype})
    assert r.status_code == 400, r.text


def test_unknown_route_and_method(client):
    assert client.get("/v1/nothing").status_code == 404
    assert client.get("/v1/score").status_code == 405


def test_pickled_code_is_never_run(client, tmp_path):
    marker = tmp_path / "pwned"
    r = client.post("/v1/completions", json=_embeds_body(_saved(_Evil(marker))))
    assert r.status_code == 400
    assert not marker.exists()


def _embedded(backend, text: str = "Review: dull and far too long\nSentiment:"):
    """A text's token ids, their input embeddings, and the model's next-token log-probs after them."""
    ids = backend.tokenizer(text)["input_ids"]
    with torch.no_grad():
        x = backend.embedding(torch.tensor(ids))
        return ids, x, torch.log_softmax(backend.model(inputs_embeds=x[None]).logits[0, -1], -1)


def test_completions_with_prompt_embeds_match_the_model(client, tiny_backend):
    ids, x, ref = _embedded(tiny_backend)
    r = client.post("/v1/completions", json=_embeds_body([encode_embeds(x), encode_embeds(x[:5])], logprobs=3,
                                                          temperature=0, return_tokens_as_token_ids=True))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and len(body["choices"]) == 2
    assert body["usage"]["prompt_tokens"] == len(ids) + 5
    lp = body["choices"][0]["logprobs"]
    top = ref.topk(3)
    assert lp["tokens"] == [f"token_id:{int(top.indices[0])}"]
    assert lp["top_logprobs"][0] == pytest.approx({f"token_id:{int(i)}": float(v) for i, v in zip(*top[::-1])},
                                                  abs=1e-5)
    # explicit ids: the sampled token plus exactly the asked ones
    r = client.post("/v1/completions", json=_embeds_body(encode_embeds(x), logprobs=1, temperature=0,
                                                         logprob_token_ids=[17, 4000], return_tokens_as_token_ids=True))
    got = r.json()["choices"][0]["logprobs"]["top_logprobs"][0]
    assert got["token_id:17"] == pytest.approx(float(ref[17]), abs=1e-5)
    assert got["token_id:4000"] == pytest.approx(float(ref[4000]), abs=1e-5)


def test_the_openai_client_sends_prompt_embeds_as_vllm_documents(server, client, tiny_backend):
    import openai

    ids, x, ref = _embedded(tiny_backend)
    model = client.get("/v1/models").json()["data"][0]["id"]
    api = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    # The client refuses prompt=None, so vLLM's own example sends prompt="" beside the embeddings.
    out = api.completions.create(model=model, prompt="", max_tokens=1, temperature=0, logprobs=3,
                                 extra_body={"prompt_embeds": encode_embeds(x), "return_tokens_as_token_ids": True})
    assert len(out.choices) == 1 and out.usage.prompt_tokens == len(ids)
    top = ref.topk(3)
    assert out.choices[0].logprobs.tokens == [f"token_id:{int(top.indices[0])}"]
    assert out.choices[0].logprobs.top_logprobs[0] == pytest.approx(
        {f"token_id:{int(i)}": float(v) for i, v in zip(top.indices, top.values)}, abs=1e-5)


def test_completions_generate_greedily_like_transformers(client, tiny_backend):
    ids = tiny_backend.tokenizer("The film was")["input_ids"]
    with torch.no_grad():
        x = tiny_backend.embedding(torch.tensor(ids))[None]
        want = tiny_backend.model.generate(inputs_embeds=x, attention_mask=torch.ones(1, x.shape[1], dtype=torch.long),
                                           max_new_tokens=4, do_sample=False, min_new_tokens=4)
    r = client.post("/v1/completions", json={"prompt": "The film was", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == tiny_backend.tokenizer.decode(want[0][-4:], skip_special_tokens=True)
    assert r.json()["usage"]["completion_tokens"] == 4


def test_classify_serves_tuned_prompts_by_name(client, tiny_backend, prompts_dir):
    for name in ("sst2-full", "sst2-delta"):
        r = client.post("/v1/classify", json={"prompt": name, "texts": TEXTS})
        assert r.status_code == 200, r.text
        saved = SavedPrompt.load(prompts_dir / name)
        init = (PromptInit("zeros", 4) if name == "sst2-full" else PromptInit("text", 4, 0, "Classify the review."))
        lp = _local(tiny_backend, saved.prompt[None], init=init).logprobs[0]
        probs = np.exp(lp - np.logaddexp.reduce(lp, axis=-1, keepdims=True))
        got = [[p["probs"]["negative"], p["probs"]["positive"]] for p in r.json()["predictions"]]
        assert np.abs(np.asarray(got) - probs).max() < 1e-5
        assert [p["label"] for p in r.json()["predictions"]] == [["negative", "positive"][i] for i in probs.argmax(-1)]
    assert client.post("/v1/classify", json={"prompt": "nope", "texts": ["x"]}).status_code == 404
    assert [p["name"] for p in client.get("/v1/prompts").json()["prompts"]] == ["e2e-gen", "sst2-delta", "sst2-full"]


def test_a_tuned_generation_prompt_is_a_model_the_openai_client_completes_with(server, client, tiny_backend,
                                                                            prompts_dir):
    """The bank for generation: /v1/models lists each tuned generation prompt as a model on the served one;
    /v1/completions with that name answers as `bbpt generate --prompt` does for the same inputs."""
    import openai

    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids[1:] == ["e2e-gen"]
    inputs = ["name[Zizzi], food[Italian]", "name[The Eagle], eatType[pub], area[riverside]"]
    api = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    got = api.completions.create(model="e2e-gen", prompt=inputs, max_tokens=6, temperature=0)
    saved = SavedPrompt.load(prompts_dir / "e2e-gen")
    tiny_backend.set_init(PromptInit("zeros", 4))
    want = tiny_backend.generate_rows(saved.prompt, [Example(t) for t in inputs], Template("Data: {text}\nText:"),
                                      max_new_tokens=6, stop=["\n"])
    assert [c.text for c in got.choices] == [w["text"] for w in want]
    assert got.usage.completion_tokens == sum(len(w["ids"]) for w in want)
    for body in ({"model": "e2e-gen", "prompt": "x", "temperature": 0.7},
                 {"model": "e2e-gen", "prompt": "x", "logprobs": 2},
                 {"model": "e2e-gen", "prompt": ""}):
        assert client.post("/v1/completions", json=body).status_code == 400
    r = client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and "e2e-gen" in r.text


def test_concurrent_requests_for_the_same_inputs_share_one_forward(tiny_backend):
    """In-process: requests queued while the model is busy are merged, and each gets its own rows back."""
    from bbpt.server.worker import ModelWorker

    worker = ModelWorker(tiny_backend, max_merge=64, max_seq_tokens=512)
    init = PromptInit("text", 4, 0, "Classify the review.")
    rng = np.random.default_rng(2)
    pops = [rng.standard_normal((k, 4, 32)).astype(np.float32) * 0.05 for k in (1, 3, 2, 5)]
    examples = [Example(t, 0) for t in TEXTS]

    async def all_at_once():
        return await asyncio.gather(*(worker.score(init, d, examples, Template(TEMPLATE), LABELS) for d in pops))

    results = asyncio.run(all_at_once())
    assert worker.forwards == 1
    for d, (lp, tokens, target_tokens) in zip(pops, results):
        ref = _local(tiny_backend, d)
        assert np.abs(lp - ref.logprobs).max() < 1e-5 and tokens == ref.tokens and target_tokens is None
    worker.close()


def test_serve_help_is_fast_and_loopback_by_default():
    from bbpt.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1" and args.port == 8000
    assert json.dumps(vars(args))     # plain values only
