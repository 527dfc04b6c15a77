"""``--backend api`` against a real ``bbpt serve``: same scores and same studies as local, and studies that
survive a server restart and a faulty network with every trial intact."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from adapters import make_backend
from adapters.http_client import HttpClient, HttpStatusError
from bbpt.cli import main as cli_main
from bbpt.errors import BackendError, ConfigError
from bbpt.prompt import PromptInit
from bbpt.tasks import load_task
from serve_helpers import FaultProxy, ServerProcess, StudyThread, run_study

KEY = "s3cret"


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    # Small request limits, so scoring a population and a split takes several requests put back together.
    s = ServerProcess(tiny_model_dir, tmp_path_factory.mktemp("logs"), "--api-key", KEY, "--max-candidates", "3",
                      "--max-examples", "20").start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, tiny_model_dir):
    """The reference: the same study with the model in-process (100 calls; shorter studies are its prefix)."""
    return run_study(tmp_path_factory.mktemp("local"), "ref", "--model", tiny_model_dir, budget=100)


@pytest.fixture
def api(server, tiny_model_dir):
    b = make_backend("api", endpoint=server.url + "/v1", api_key=KEY, model=tiny_model_dir)
    yield b
    b.close()


def _same_trials(got: dict, ref: dict, n: int) -> None:
    assert got["numbers"] == list(range(n))
    assert got["states"] == {"complete"}
    assert np.abs(np.asarray(got["losses"]) - np.asarray(ref["losses"][:n])).max() < 1e-5


def test_api_scores_equal_local(api, tiny_backend):
    info = api.info()
    assert (info.hidden_size, info.gradients) == (32, False)
    assert info.embed_std == pytest.approx(tiny_backend.info().embed_std)
    task = load_task(task="sst2", shots=16, seed=0)
    init = PromptInit("text", 4, 0, "Classify the review.")
    deltas = np.random.default_rng(0).standard_normal((5, 4, 32)).astype(np.float32) * 0.05
    for backend in (api, tiny_backend):
        backend.set_init(init)
    # 5 candidates x 32 examples with limits of 3 and 20 per request: four requests, reassembled
    got = api.score(deltas, api.encode(task.train, task.template, task.label_words))
    ref = tiny_backend.score(deltas, tiny_backend.encode(task.train, task.template, task.label_words))
    assert got.logprobs.shape == (5, 32, 2)
    assert np.abs(got.logprobs - ref.logprobs).max() < 1e-5
    assert got.tokens == ref.tokens
    assert got.bytes_sent > deltas.nbytes and got.bytes_received > 0
    base = api.score(None, api.encode(task.dev, task.template, task.label_words))
    assert np.abs(base.logprobs - tiny_backend.score(None, tiny_backend.encode(task.dev, task.template,
                                                                                task.label_words)).logprobs).max() < 1e-5


@pytest.mark.parametrize("depth", ["deep", "prefix"])
def test_a_deep_or_prefix_prompt_over_api_scores_as_locally(api, tiny_backend, depth):
    """The server builds the layer prompts from the init spec; the client learns only their shape and scales."""
    task = load_task(task="sst2", shots=4, seed=0, prompt_position="prefix")
    init = PromptInit("text", 4, 0, "Classify the review.", depth=depth)
    sites = []
    for backend in (api, tiny_backend):
        backend.set_init(init)
        sites.append(backend.prompt_site())
    assert sites[0] == sites[1] and sites[0].depth == depth
    assert depth in api.info().depths
    deltas = np.random.default_rng(0).standard_normal((4, *sites[0].shape)).astype(np.float32) * 0.05
    got = api.score(deltas, api.encode(task.train, task.template, task.label_words))
    ref = tiny_backend.score(deltas, tiny_backend.encode(task.train, task.template, task.label_words))
    assert np.abs(got.logprobs - ref.logprobs).max() < 1e-5
    with pytest.raises(BackendError, match="expected \\[pop"):
        api.score(deltas[:, :1], api.encode(task.train, task.template, task.label_words))
    tiny_backend.set_init(PromptInit("text", 4, 0, "Classify the review."))      # the shared fixture as it was


def test_api_study_equals_local_study(server, tmp_path, tiny_model_dir, local_run):
    got = run_study(tmp_path, "api", "--backend", "api", "--endpoint", server.url, "--api-key", KEY,
                    "--model", tiny_model_dir, budget=24)
    _same_trials(got, local_run, 24)
    assert all(t.metrics["bytes_sent"] > 0 for t in got["trials"])


def test_a_deep_layerwise_study_over_api_equals_the_local_one(server, tmp_path, tiny_model_dir):
    """`bbpt optimize --backend api --depth deep`: the same trials as with the model in-process."""
    deep = ("--depth", "deep", "--schedule", "layerwise", "--prompt-position", "prefix")
    ref = run_study(tmp_path, "local", "--model", tiny_model_dir, *deep, budget=16)
    got = run_study(tmp_path, "api", "--backend", "api", "--endpoint", server.url, "--api-key", KEY,
                    "--model", tiny_model_dir, *deep, budget=16)
    _same_trials(got, ref, 16)


def test_wrong_key_and_wrong_model_fail_at_once(server, tiny_model_dir):
    start = time.perf_counter()
    with pytest.raises(HttpStatusError, match="401"):
        make_backend("api", endpoint=server.url, api_key="wrong", model=tiny_model_dir)
    with pytest.raises(ConfigError, match="serves"):
        make_backend("api", endpoint=server.url, api_key=KEY, model="gpt-17")
    assert time.perf_counter() - start < 5          # refusals are not retried


def test_backprop_over_api_is_a_clear_error(server, tmp_path, tiny_model_dir, capsys):
    rc = cli_main(["optimize", "--task", "sst2", "--optimizer", "backprop", "--backend", "api", "--endpoint",
                   server.url, "--api-key", KEY, "--model", tiny_model_dir, "--storage",
                   f"sqlite:///{tmp_path / 'b.db'}"])
    assert rc == 2
    assert "needs local weights" in capsys.readouterr().err


def test_a_server_that_never_answered_fails_at_once_naming_the_endpoint_and_the_fix():
    # Nothing listens on the discard port: a wrong --endpoint or a server not started; backoff cannot mend it.
    start = time.perf_counter()
    with pytest.raises(BackendError, match=r"cannot connect to http://127.0.0.1:9 .*start it .*or fix --endpoint"):
        make_backend("api", endpoint="http://127.0.0.1:9", model="x")
    assert time.perf_counter() - start < 5


def test_a_server_that_has_answered_is_retried_once_it_goes_away(monkeypatch):
    monkeypatch.setenv("BBPT_HTTP_RETRIES", "2")

    class Answers(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Answers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = HttpClient(f"http://127.0.0.1:{server.server_port}")
    try:
        assert client.get("/health").body == {}
        server.shutdown()
        server.server_close()          # now refused, as a restarting server is
        with pytest.raises(BackendError, match="failed after 2 attempt"):
            client.get("/health")
    finally:
        client.close()


def test_clients_import_the_wire_format_downward_not_the_server_package():
    code = ("import sys, adapters.api, adapters.vllm; "
            "print(sorted(m for m in sys.modules if m.startswith('bbpt.server')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_study_survives_a_server_killed_and_restarted(tiny_model_dir, tmp_path, local_run):
    server = ServerProcess(tiny_model_dir, tmp_path).start()
    run = StudyThread(tmp_path, "restart", "--backend", "api", "--endpoint", server.url, "--model", tiny_model_dir,
                      budget=100)
    try:
        done_at_kill = run.wait_for_trials(8)
        server.kill()
        time.sleep(1.0)
        server.start()
        rc = run.join()
    finally:
        server.stop()
    assert rc == 0
    assert 8 <= done_at_kill < 100, "the server must die in the middle of the study"
    row = run.store.require_study("restart")
    trials = run.store.trials(row.id)
    got = dict(numbers=[t.number for t in trials], losses=[t.loss for t in trials], states={t.state for t in trials})
    _same_trials(got, local_run, 100)
    assert row.summary["calls"] == 100


def test_faulty_network_study_stores_exactly_its_budget(server, tmp_path, tiny_model_dir, local_run, monkeypatch):
    # The proxy's delay outlasts the client's timeout, so that fault reads as a timeout and is retried.
    monkeypatch.setenv("BBPT_HTTP_TIMEOUT", "2")
    proxy = FaultProxy(server.port, rate=0.2, seed=1, delay=3.0).start()
    try:
        got = run_study(tmp_path, "faulty", "--backend", "api", "--endpoint", proxy.url, "--api-key", KEY,
                        "--model", tiny_model_dir, budget=100)
    finally:
        proxy.stop()
    assert set(proxy.faults) == set(FaultProxy.KINDS), proxy.faults      # every kind of fault happened
    _same_trials(got, local_run, 100)                                   # exactly 100 good calls, no bad one
    assert got["summary"]["calls"] == 100


@pytest.mark.slow
def test_real_default_model_through_serve(real_backend, tmp_path):
    """SmolLM2-135M behind a real bbpt serve: api and vllm clients score as the local backend does."""
    server = ServerProcess("smollm2-135m", tmp_path).start()
    clients = []
    try:
        task = load_task(task="sst2", shots=16, seed=0)
        examples = task.train[:8]
        init = PromptInit("text", 10, 0, "Classify the sentiment of this movie review.")
        std = real_backend.info().embed_std
        deltas = np.random.default_rng(0).standard_normal((2, 10, 576)).astype(np.float32) * std * 0.3
        real_backend.set_init(init)
        ref = real_backend.score(deltas, real_backend.encode(examples, task.template, task.label_words)).logprobs
        for kind, url, n in (("api", server.url, 8), ("vllm", server.url + "/v1", 4)):
            b = make_backend(kind, endpoint=url, model="smollm2-135m")
            clients.append(b)
            b.set_init(init)
            got = b.score(deltas, b.encode(examples[:n], task.template, task.label_words)).logprobs
            assert np.abs(got - ref[:, :n]).max() < 1e-4, kind
    finally:
        for b in clients:
            b.close()
        server.stop()
