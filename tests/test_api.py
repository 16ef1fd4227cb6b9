"""`run.py serve` (OpenAI-compatible, merges per request) queried by the real `openai` client, and the
API fitness searching merge weights through it, with injected 429 / 500 / timeouts / bad bodies."""
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import yaml

from conftest import ROOT
from evomerge.serve.harness import LocalServer
from hf_models import tiny_family

KEY = "sk-test-0123456789"


def start_server(cfg_path, *extra, env=None) -> LocalServer:
    return LocalServer("--config", str(cfg_path), *extra, env=env)


def health(port) -> dict:
    return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read())


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    base, experts = tiny_family(root)
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b), "split": "train" if i < 8 else "test"}
            for i, (a, b) in enumerate((i % 5, i % 3) for i in range(12))]
    (root / "add.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    mc = [{"prompt": f"{a}+{b}=", "choices": [str(a + b), str(a + b + 1)], "answer": 0, "split": "train"}
          for a, b in [(1, 2), (2, 2), (3, 1)]]
    (root / "add_mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    cfg = {"space": {"name": "hf_merge", "method": "task_arithmetic", "layer_granularity": 0,
                     "cache_dir": str(root / "tv"),
                     "models": {"base": str(base), "experts": {k: str(v) for k, v in experts.items()}}},
           "strategy": {"name": "random"},
           "fitness": {"name": "lm_tasks", "tasks": [{"name": "add", "path": str(root / "add.jsonl"),
                                                      "kind": "generate"}]}}
    (root / "serve.yaml").write_text(yaml.safe_dump(cfg))
    return root


@pytest.fixture(scope="module")
def server(family):
    # --max-context: the judge's prompt (~115 tokens) is longer than the tiny models' 64 positions
    with start_server(family / "serve.yaml", "--api-key-env", "EVOMERGE_TEST_KEY", "--merge-cache", "2",
                      "--max-context", "256", env={"EVOMERGE_TEST_KEY": KEY}) as srv:
        yield srv.port


def client(port, key=KEY):
    from openai import OpenAI

    return OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=30)


def test_models_completions_chat_and_logprobs(server):
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["base", "a", "b", "c"]
    r = c.completions.create(model="a", prompt="1+2=", max_tokens=4, temperature=0, logprobs=2)
    again = c.completions.create(model="a", prompt="1+2=", max_tokens=4, temperature=0, logprobs=2)
    assert r.choices[0].text == again.choices[0].text  # greedy is deterministic
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == r.usage.completion_tokens == len(lp.token_logprobs) and r.usage.prompt_tokens > 0
    assert all(max(top.values()) >= v - 1e-6 for top, v in zip(lp.top_logprobs, lp.token_logprobs))
    echo = c.completions.create(model="base", prompt="1+2=3", max_tokens=0, echo=True, logprobs=0)
    assert echo.choices[0].text == "1+2=3" and echo.choices[0].logprobs.token_logprobs[0] is None
    chat = c.chat.completions.create(model="b", messages=[{"role": "user", "content": "2+2="}], max_tokens=3,
                                     temperature=0, logprobs=True, top_logprobs=2)
    assert chat.choices[0].message.role == "assistant" and len(chat.choices[0].logprobs.content) <= 3


def test_merge_coefficients_in_the_request_pick_the_model(server):
    c = client(server)

    def ll(**kw):
        r = c.completions.create(prompt="3+4=7", max_tokens=0, echo=True, logprobs=0, **kw)
        return r.choices[0].logprobs.token_logprobs[1:]

    before = health(server)["merges"]
    as_b = ll(model="base", extra_body={"merge": {"weights": {"b": 1.0}}})
    assert as_b == pytest.approx(ll(model="b"), abs=1e-5)  # expert b == base + 1.0 * task vector b
    half = ll(model="base", extra_body={"merge": {"weights": {"a": 0.5, "c": 0.25}}})
    assert half != pytest.approx(ll(model="base"), abs=1e-4)
    same = ll(model="base", extra_body={"merge": {"weights": {"a": 0.5, "c": 0.25}}})
    assert same == half
    h = health(server)
    assert h["merge_reused"] >= 1 and h["merges"] - before <= 5


def test_switching_between_cached_merges_copies_instead_of_merging(server):
    c = client(server)
    one, two = {"merge": {"weights": {"a": 0.7}}}, {"merge": {"weights": {"b": -0.4, "c": 0.9}}}

    def ll(body):
        r = c.completions.create(model="base", prompt="4+1=5", max_tokens=0, echo=True, logprobs=0, extra_body=body)
        return r.choices[0].logprobs.token_logprobs[1:]

    first, second = ll(one), ll(two)
    before = health(server)
    assert [ll(one), ll(two), ll(one)] == [first, second, first]
    after = health(server)
    assert after["merges"] == before["merges"] and after["merge_cache_hits"] - before["merge_cache_hits"] == 3


# a mix of prompt lengths, stops, max_tokens, logprobs and echo (the tiny tokenizer: one token per character)
MIX = [dict(prompt="1+2=", max_tokens=4), dict(prompt="12+34+5=", max_tokens=6, stop=["3"]),
       dict(prompt="7=", max_tokens=1, logprobs=2), dict(prompt="9+9+9+9+9+9=", max_tokens=5, stop="=", logprobs=0),
       dict(prompt="3+4=7", max_tokens=0, echo=True, logprobs=0),
       dict(prompt="5+", max_tokens=3, echo=True, logprobs=1),
       dict(prompt="0", max_tokens=8, stop=["1", "2"]), dict(prompt="abc+def=", max_tokens=2, logprobs=3)]


def answers(c, requests, extra=None, threads=1) -> list[tuple]:
    """(text, finish_reason, completion tokens, tokens, logprobs) of each request, `threads` at a time."""
    from concurrent.futures import ThreadPoolExecutor

    def one(kw):
        r = c.completions.create(model="base", temperature=0, extra_body=extra, **kw).choices[0]
        lp = r.logprobs
        return (r.text, r.finish_reason, lp and lp.tokens, lp and lp.token_logprobs, lp and lp.top_logprobs)

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, requests))


def same(got, want) -> None:
    for g, w in zip(got, want, strict=True):
        assert g[:3] == w[:3]  # the same text, finish_reason and tokens
        assert (g[3] is None) == (w[3] is None) and g[3] == pytest.approx(w[3], abs=1e-4, nan_ok=True)
        for tg, tw in zip(g[4] or [], w[4] or [], strict=True):
            assert (tg is None) == (tw is None) and (tg is None or tg == pytest.approx(tw, abs=1e-4))


def test_concurrent_greedy_requests_answer_as_one_at_a_time(server):
    c = client(server)
    alone = answers(c, MIX)
    assert [a[1] for a in alone].count("stop") >= 1 and alone[4][0] == "3+4=7"
    same(answers(c, MIX * 3, threads=12), alone * 3)
    merged = {"merge": {"weights": {"a": 0.6, "c": -0.3}}}
    alone_merged = answers(c, MIX, merged)
    assert alone_merged != alone
    # two merges at once: each request is answered by its own merge, whatever it was batched with
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        both = [pool.submit(answers, c, MIX * 2, extra, 8) for extra in (None, merged)]
        same(both[0].result(), alone * 2)
        same(both[1].result(), alone_merged * 2)
    h = health(server)
    assert h["batches"] >= 1 and h["batched_rows"] >= 5 * len(MIX) and h["largest_batch"] >= 1


def test_a_multi_prompt_completion_is_one_batch_answering_as_each_prompt_alone(server):
    c = client(server)
    prompts = ["1+2=", "12+34+5=", "7=", "9+9+9+9+9+9="]
    alone = [c.completions.create(model="a", prompt=p, max_tokens=5, temperature=0, logprobs=1) for p in prompts]
    before = health(server)
    r = c.completions.create(model="a", prompt=prompts, max_tokens=5, temperature=0, logprobs=1)
    after = health(server)
    assert after["batches"] - before["batches"] == 1 and after["batched_rows"] - before["batched_rows"] == 4
    assert after["requests"] - before["requests"] == 4 and after["largest_batch"] >= 4
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert r.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    for ch, a in zip(r.choices, alone):
        assert ch.text == a.choices[0].text and ch.finish_reason == a.choices[0].finish_reason
        assert ch.logprobs.token_logprobs == pytest.approx(a.choices[0].logprobs.token_logprobs, abs=1e-4)
    seeded = dict(model="a", max_tokens=6, temperature=1.0, top_p=0.9, seed=7)
    one = c.completions.create(prompt="1+2=", **seeded).choices[0].text
    assert c.completions.create(prompt=["1+2=", "12+34+5="], **seeded).choices[0].text == one  # its own seed


def test_a_merge_the_scheduler_cannot_build_fails_its_requests_only(server, family):
    from concurrent.futures import ThreadPoolExecutor

    from evomerge.config import load_config
    from evomerge.spaces import build_space

    import openai

    cfg = load_config(family / "serve.yaml")
    space = build_space(cfg.space, cfg.seed)
    recipe = space.decode((space.lower + space.upper) / 2)
    for g in recipe["groups"].values():
        g["weight"] = g["weight"][:1]  # one weight for three experts: refused by the merge itself
    c = client(server)

    def bad():
        with pytest.raises(openai.BadRequestError, match="merge: cannot build this merge"):
            c.completions.create(model="base", prompt="1+2=", max_tokens=2, extra_body={"merge": {"recipe": recipe}})
        return True

    with ThreadPoolExecutor(4) as pool:
        good = [pool.submit(answers, c, MIX[:3]) for _ in range(2)]
        assert all(pool.map(lambda _: bad(), range(4)))
        assert [g.result() for g in good] == [answers(c, MIX[:3])] * 2


def test_the_scheduler_serves_merges_fifo_and_batches_within_the_caps():
    """ModelHost._pick alone: the rows of one merge in arrival order, FIFO by merge, the held merge keeping
    the model one more batch at most, within max_batch_rows and max_batch_tokens."""
    import threading

    from evomerge.serve.batch import Row
    from evomerge.serve.host import ModelHost, _Job

    host = ModelHost.__new__(ModelHost)
    host.cv, host.pending, host._seq, host._picked_at = threading.Condition(), [], 0, 0
    host.current, host.max_batch_rows, host.max_batch_tokens = None, 32, 16384

    def send(key, *lengths, new=4):
        job = _Job(key, {}, [Row([1] * n, new) for n in lengths])
        for i in range(len(lengths)):
            host.pending.append((host._seq, job, i))
            host._seq += 1

    def pick():
        batch = host._pick()
        host.current = batch[0][1].key  # the scheduler then holds this merge
        return [(job.key, seq) for seq, job, _ in batch]

    send("A", 3, 5)
    send("B", 2)
    send("A", 4)
    assert pick() == [("A", 0), ("A", 1), ("A", 3)]  # every waiting row of the oldest merge
    send("A", 2)  # more of the held merge, but B has waited through a whole batch: B's turn
    assert pick() == [("B", 2)]
    assert pick() == [("A", 4)]
    send("C", 2)  # C arrives during A's batch: A keeps the model one more batch...
    send("A", 3)
    assert pick() == [("A", 6)]
    send("A", 1)
    assert pick() == [("C", 5)]  # ...then C, which has waited through it, before A's newer row
    assert pick() == [("A", 7)] and not host.pending
    host.max_batch_rows = 2
    send("A", *[1] * 5)
    assert [len(host._pick()) for _ in range(3)] == [2, 2, 1]
    host.max_batch_rows, host.max_batch_tokens = 32, 30  # rows x (longest prompt + most new tokens)
    send("A", 60, 1, 1)  # a row over the cap still goes alone
    assert [len(host._pick()) for _ in range(2)] == [1, 2]
    send("A", 2, 2, 2, 2, 2, 2)  # (2 + 4) x 5 = 30
    assert [len(host._pick()) for _ in range(2)] == [5, 1] and not host.pending


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server):
    import openai

    c = client(server)
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").models.list()
    with pytest.raises(openai.NotFoundError, match="model 'nope' does not exist"):
        c.completions.create(model="nope", prompt="1")
    with pytest.raises(openai.BadRequestError, match="unknown expert 'zz'"):
        c.completions.create(model="base", prompt="1", extra_body={"merge": {"weights": {"zz": 1.0}}})
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        c.completions.create(model="base", prompt="1", max_tokens=-3)
    with pytest.raises(openai.BadRequestError, match="merge.recipe"):
        c.completions.create(model="base", prompt="1", extra_body={"merge": {"recipe": {"method": "ties"}}})
    req = urllib.request.Request(f"http://127.0.0.1:{server}/v1/completions", data=b"{oops",
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 400 and "not valid JSON" in json.loads(err.value.read())["error"]["message"]
    assert c.completions.create(model="base", prompt="1+1=", max_tokens=2, temperature=0).choices


def test_missing_api_key_variable_is_one_line(family, cli):
    r = cli("serve", "--config", str(family / "serve.yaml"), "--api-key-env", "EVOMERGE_UNSET_VAR_XYZ")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: --api-key-env EVOMERGE_UNSET_VAR_XYZ: the environment variable is not set or empty"]


def search_config(family, port, tmp_path, **fitness) -> str:
    cfg = {"seed": 0,
           "space": {"name": "api_weights", "models": ["a", "b", "c"], "weight": {"low": -0.5, "high": 1.0}},
           "strategy": {"name": "cmaes", "popsize": 4, "sigma0": 0.3, "x0": "center"},
           "fitness": {"name": "api", "base_url": f"http://127.0.0.1:{port}/v1", "api_key_env": "EVOMERGE_TEST_KEY",
                       "tasks": [{"name": "add", "path": str(family / "add.jsonl"), "kind": "generate",
                                  "max_new_tokens": 2},
                                 {"name": "add_mc", "path": str(family / "add_mc.jsonl"), "kind": "choice"}],
                       **fitness},
           "engine": {"workers": 2, "batch_size": 1, "queue_depth": 1},
           "budget": {"max_evals": 8}}
    path = tmp_path / "api.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def run_with_key(*args):
    return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "EVOMERGE_TEST_KEY": KEY})


def test_no_server_or_a_refused_key_is_one_line_before_the_search(server, family, tmp_path):
    import socket

    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    out = tmp_path / "run"
    r = run_with_key("--config", search_config(family, free, tmp_path, timeout_s=1), "--out", str(out), "--no-progress")
    assert r.returncode == 2 and not out.exists()
    waiting, line = r.stderr.strip().splitlines()  # it waits fitness.timeout_s for a server still starting
    assert waiting == f"waiting up to 1 s (fitness.timeout_s) for http://127.0.0.1:{free}/v1 to answer"
    assert line.startswith(f"error: fitness.base_url: nothing answers at http://127.0.0.1:{free}/v1")
    r = subprocess.run([sys.executable, "run.py", "--config", search_config(family, server, tmp_path), "--out",
                        str(out), "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "EVOMERGE_TEST_KEY": "sk-wrong"})
    assert r.returncode == 2 and not out.exists()
    assert r.stderr.strip().splitlines() == [
        f"error: fitness.api_key_env: http://127.0.0.1:{server}/v1 refused the key ($EVOMERGE_TEST_KEY): HTTP 401"]


def test_api_search_with_injected_faults_loses_nothing_and_keeps_the_budget(family, tmp_path):
    srv = start_server(family / "serve.yaml", "--api-key-env", "EVOMERGE_TEST_KEY", "--chaos", "0.2",
                       "--chaos-timeout-s", "1.5", env={"EVOMERGE_TEST_KEY": KEY})
    port = srv.port
    try:
        cfg = search_config(family, port, tmp_path, timeout_s=0.75, backoff_s=0.01, concurrency=4)
        out = tmp_path / "run"
        r = run_with_key("--config", cfg, "--out", str(out), "--no-progress")
        assert r.returncode == 0, r.stderr
        evals = [json.loads(line) for line in (out / "evals.jsonl").read_text().splitlines()]
        assert len(evals) == 8 and not any(e.get("failed") for e in evals)  # retried, never lost
        assert sum(e["metrics"]["api_retries"] for e in evals) > 0
        chaos = health(port)["chaos"]
        assert chaos["429"] + chaos["500"] + chaos["timeout"] + chaos["malformed"] > 0
        # a hard budget: the run stops cleanly once it is spent, never above it
        before = health(port)["chaos"]["posts"]
        out2 = tmp_path / "run2"
        cfg2 = search_config(family, port, tmp_path, timeout_s=0.75, backoff_s=0.01, concurrency=4,
                             max_requests=40, cache_size=0)
        r = run_with_key("--config", cfg2, "--out", str(out2), "--no-progress")
        assert r.returncode == 0, r.stderr
        assert "stopped by the fitness: StopRun: API budget spent" in r.stderr
        summary = json.loads((out2 / "summary.json").read_text())
        assert summary["stop_reason"] == "fitness_stop" and summary["failed"] == 0
        assert health(port)["chaos"]["posts"] - before == 40  # the whole budget, not one request more
        # resumed with a larger budget: what the first session spent still counts
        r = run_with_key("--resume", str(out2), "--set", "fitness.max_requests=70", "--no-progress")
        assert r.returncode == 0, r.stderr
        assert json.loads((out2 / "summary.json").read_text())["stop_reason"] == "fitness_stop"
        assert health(port)["chaos"]["posts"] - before == 70
    finally:
        srv.close()
    for f in list(out.rglob("*")) + list(out2.rglob("*")):  # the key is in no file of the runs
        if f.is_file():
            assert KEY.encode() not in f.read_bytes(), f


def test_ensemble_mode_and_judge_through_the_openai_client(server, family, monkeypatch):
    from evomerge.fitness.api import APIFitness, APIFitnessConfig

    monkeypatch.setenv("EVOMERGE_TEST_KEY", KEY)
    common = dict(name="api", base_url=f"http://127.0.0.1:{server}/v1", api_key_env="EVOMERGE_TEST_KEY",
                  tasks=[{"name": "add", "path": str(family / "add.jsonl"), "kind": "generate", "max_new_tokens": 2},
                         {"name": "add_mc", "path": str(family / "add_mc.jsonl"), "kind": "choice"}])
    merge = APIFitness(APIFitnessConfig(**common))
    ensemble = APIFitness(APIFitnessConfig(**common, mode="ensemble"))
    only_b = {"weights": {"a": 0.0, "b": 1.0, "c": 0.0}}
    f_merge, s_merge, m = merge.evaluate_recipe(only_b)  # server-side merge == expert b
    f_ens, s_ens, m_ens = ensemble.evaluate_recipe(only_b)  # a vote of b alone
    assert f_merge == f_ens and list(s_merge) == list(s_ens)
    assert m_ens["api_requests"] == 8 + 3 * 2 and m["api_prompt_tokens"] > 0
    again = ensemble.evaluate_recipe(only_b)[2]
    assert again["api_requests"] == 0 and again["api_cached"] == 8 + 3 * 2  # served from the response cache
    _, _, m3 = ensemble.evaluate_recipe({"weights": {"a": 0.5, "b": 0.3, "c": -0.2}})
    assert m3["api_requests"] == 3 * (8 + 3 * 2) - m3["api_cached"]
    judged = APIFitness(APIFitnessConfig(**common, judge_model="base"))
    _, scores, mj = judged.evaluate_recipe(only_b)
    assert mj["api_requests"] == 8 + 8 + 3 * 2 and set(scores[:8]) <= {0.0, 1.0}  # one judge call per answer


def test_budget_reserves_an_upper_bound_and_settles_to_the_usage():
    from evomerge.fitness.budget import Budget

    b = Budget(max_requests=3, max_tokens=100)
    assert b.reserve(60) and not b.reserve(50)  # 110 > 100 tokens
    b.settle(60, 20)
    assert b.reserve(50) and b.reserve(10) and not b.reserve(1)  # the 4th request is over max_requests
    assert b.spent() == {"requests": 3, "tokens": 80}


def test_serve_a_run_answers_model_merged_with_its_best(family, tmp_path):
    cfg = yaml.safe_load((family / "serve.yaml").read_text())
    cfg.update(engine={"workers": 1, "batch_size": 1}, budget={"max_evals": 2})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "run.py", "--config", str(tmp_path / "run.yaml"),
                        "--out", str(tmp_path / "run"), "--no-progress"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    best = json.loads((tmp_path / "run" / "best" / "recipe.json").read_text())
    with LocalServer("--run", str(tmp_path / "run")) as srv:
        c = client(srv.port)
        assert [m.id for m in c.models.list().data] == ["merged", "base", "a", "b", "c"]
        got = c.completions.create(model="merged", prompt="1+2=3", max_tokens=0, echo=True, logprobs=0)
        same = c.completions.create(model="base", prompt="1+2=3", max_tokens=0, echo=True, logprobs=0,
                                    extra_body={"merge": {"recipe": best}})
        assert got.choices[0].logprobs.token_logprobs == same.choices[0].logprobs.token_logprobs
