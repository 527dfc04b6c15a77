"""``--endpoint A,B``: one population spread over several real ``bbpt serve`` processes scores as one server
(and the model in-process) does, and a study survives one of them being killed mid-run."""

from __future__ import annotations

import numpy as np
import pytest

from adapters import make_backend
from adapters.http_pool import endpoint_urls
from bbpt.errors import BackendError, ConfigError
from bbpt.prompt import PromptInit
from bbpt.tasks import load_task
from serve_helpers import ServerProcess, StudyThread, run_study


@pytest.fixture(scope="module")
def servers(tiny_model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    pair = [ServerProcess(tiny_model_dir, logs, "--max-candidates", "3").start() for _ in range(2)]
    yield pair
    for s in pair:
        s.stop()


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, tiny_model_dir):
    return run_study(tmp_path_factory.mktemp("local"), "ref", "--model", tiny_model_dir, budget=40)


def _pool_url(servers) -> str:
    return ",".join(s.url for s in servers)


def test_a_population_over_two_servers_scores_as_one_server_and_as_local(servers, tiny_backend, tiny_model_dir):
    task = load_task(task="sst2", shots=16, seed=0)
    init = PromptInit("text", 4, 0, "Classify the review.")
    deltas = np.random.default_rng(0).standard_normal((7, 4, 32)).astype(np.float32) * 0.05
    one = make_backend("api", endpoint=servers[0].url, model=tiny_model_dir)
    two = make_backend("api", endpoint=_pool_url(servers), model=tiny_model_dir)
    try:
        got = {}
        for name, b in (("one", one), ("two", two), ("local", tiny_backend)):
            b.set_init(init)
            got[name] = b.score(deltas, b.encode(task.train, task.template, task.label_words))
        assert np.abs(got["two"].logprobs - got["one"].logprobs).max() < 1e-5
        assert np.abs(got["two"].logprobs - got["local"].logprobs).max() < 1e-5
        assert got["two"].tokens == got["one"].tokens
        # each candidate says who scored it, and both servers took a share
        by = [p["endpoint"] for p in got["two"].per_prompt]
        assert set(by) == {s.url for s in servers}
        assert got["one"].per_prompt is None            # one server: trials' metrics stay as they were
        # one prompt on a split is spread by examples
        dev = two.score(None, two.encode(task.dev, task.template, task.label_words))
        ref = one.score(None, one.encode(task.dev, task.template, task.label_words))
        assert np.abs(dev.logprobs - ref.logprobs).max() < 1e-5
        assert dev.per_prompt[0]["endpoint"] == ",".join(sorted(s.url for s in servers))
    finally:
        one.close()
        two.close()


def test_a_study_over_two_servers_equals_the_local_one_and_counts_each_servers_calls(servers, tmp_path,
                                                                                     tiny_model_dir, local_run):
    got = run_study(tmp_path, "pool", "--backend", "api", "--endpoint", _pool_url(servers),
                    "--model", tiny_model_dir, budget=40)
    assert got["numbers"] == list(range(40))
    assert np.abs(np.asarray(got["losses"]) - np.asarray(local_run["losses"])).max() < 1e-5
    served = got["summary"]["calls_by_endpoint"]
    assert set(served) == {s.url for s in servers} and sum(served.values()) == 40
    assert min(served.values()) >= 8, served          # popsize 4 over two servers: both take part


def test_a_server_killed_mid_study_leaves_the_study_complete_and_correct(tiny_model_dir, tmp_path, local_run,
                                                                         monkeypatch):
    monkeypatch.setenv("BBPT_HTTP_RETRIES", "2")       # a dead server is given up on after ~1 s, not a minute
    pair = [ServerProcess(tiny_model_dir, tmp_path).start() for _ in range(2)]
    run = StudyThread(tmp_path, "kill", "--backend", "api", "--endpoint", _pool_url(pair), "--model", tiny_model_dir,
                      budget=40)
    try:
        done_at_kill = run.wait_for_trials(8)
        pair[1].kill()
        rc = run.join()
    finally:
        for s in pair:
            s.stop()
    assert rc == 0
    assert 8 <= done_at_kill < 40, "the server must die in the middle of the study"
    row = run.store.require_study("kill")
    trials = run.store.trials(row.id, with_z=False)
    assert [t.number for t in trials] == list(range(40))
    assert np.abs(np.asarray([t.loss for t in trials]) - np.asarray(local_run["losses"])).max() < 1e-5
    served = row.summary["calls_by_endpoint"]
    assert served[pair[0].url] > served.get(pair[1].url, 0) and sum(served.values()) == 40
    assert trials[-1].metrics["endpoint"] == pair[0].url     # after the kill, the survivor did the work


def test_when_every_server_is_gone_the_call_fails_naming_them(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("BBPT_HTTP_RETRIES", "1")
    pair = [ServerProcess(tiny_model_dir, tmp_path).start() for _ in range(2)]
    b = make_backend("api", endpoint=_pool_url(pair), model=tiny_model_dir)
    try:
        task = load_task(task="sst2", shots=4, seed=0)
        b.set_init(PromptInit("text", 4, 0, "Classify the review."))
        batch = b.encode(task.train, task.template, task.label_words)
        for s in pair:
            s.kill()
        with pytest.raises(BackendError, match="every endpoint of .* failed") as e:
            b.score(np.zeros((4, 4, 32), np.float32), batch)
        assert all(s.url in str(e.value) for s in pair)
    finally:
        b.close()
        for s in pair:
            s.stop()


def test_servers_with_different_limits_are_refused_before_any_call(servers, tiny_model_dir, tmp_path):
    other = ServerProcess(tiny_model_dir, tmp_path, "--max-candidates", "5").start()
    try:
        with pytest.raises(ConfigError, match="limits"):
            make_backend("api", endpoint=f"{servers[0].url},{other.url}", model=tiny_model_dir)
    finally:
        other.stop()


def test_endpoint_lists_are_checked():
    assert endpoint_urls("http://a:1/v1, http://b:2") == ["http://a:1", "http://b:2"]
    with pytest.raises(ConfigError, match="more than once"):
        endpoint_urls("http://a:1,http://a:1/v1")
    with pytest.raises(ConfigError, match="not an http"):
        endpoint_urls("http://a:1,ftp://b")
    with pytest.raises(ConfigError, match="only --backend api"):
        make_backend("vllm", endpoint="http://a:1/v1,http://b:1/v1", model="m")
