"""What `evomerge serve` refuses, with a 400 in OpenAI's error body naming the field, before the request
reaches the model: non-finite or absurd merge coefficients (bare NaN / Infinity JSON tokens included), NaN
inside a recipe, prompts longer than the model's context; and `--port` mistakes as one line, exit 2."""
import json
import math
import socket
import subprocess
import sys

import urllib.error
import urllib.request

import pytest

from evomerge.serve.harness import LocalServer
from evomerge.wire import MAX_COEFFICIENT
from test_api import client, family  # noqa: F401 - family: the tiny-LM models (context: 64 tokens), serve.yaml

CONTEXT = 64  # tests/hf_models.py: max_position_embeddings; its tokenizer makes one token of each character


@pytest.fixture(scope="module")
def server(family, tmp_path_factory):  # noqa: F811 - the imported fixture
    # started as `python -m evomerge serve` from a directory that is not the checkout
    with LocalServer("--config", str(family / "serve.yaml"), cwd=str(tmp_path_factory.mktemp("elsewhere"))) as srv:
        assert srv.proc.args[1:4] == ["-m", "evomerge", "serve"] and not any("run.py" in a for a in srv.proc.args)
        yield srv


@pytest.fixture(scope="module")
def recipe(family):  # noqa: F811
    """A valid recipe of the served space (the centre of its box)."""
    from evomerge.config import load_config
    from evomerge.spaces import build_space

    cfg = load_config(family / "serve.yaml")
    space = build_space(cfg.space, cfg.seed)
    return space.decode((space.lower + space.upper) / 2)


def post(server, body: str, path: str = "completions") -> tuple[int, dict]:
    """A raw JSON body (bare NaN / Infinity tokens, as a client may send them): the status and the JSON answer."""
    req = urllib.request.Request(f"{server.url}/{path}", data=body.encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def assert_400(answer: tuple[int, dict], param: str, *words: str) -> dict:
    status, body = answer
    assert status == 400, body
    err = body["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    assert err["message"].startswith(param + ":") and all(w in err["message"] for w in words), err
    return err


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e308", "1e999", "-101", "100.5"])
def test_non_finite_or_absurd_merge_weights_are_a_400_naming_the_field(server, value):
    before = server.health()
    r = post(server, '{"model": "base", "prompt": "1+2=", "max_tokens": 1, "merge": {"weights": {"a": 0.5, "b": %s}}}'
             % value)
    assert_400(r, "merge.weights.b", "finite" if value in ("NaN", "Infinity", "-Infinity", "1e999") else "100")
    r = post(server, '{"model": "base", "prompt": "1+2=", "merge": {"weights": {"a": 0.5}, "density": {"c": %s}}}'
             % value)
    assert_400(r, "merge.density.c")
    after = server.health()
    assert (after["requests"], after["merges"]) == (before["requests"], before["merges"])  # never reached the model


def test_the_largest_coefficient_is_served(server):
    c = client(server.port)
    r = c.completions.create(model="base", prompt="1+2=", max_tokens=1, temperature=0, logprobs=1,
                             extra_body={"merge": {"weights": {"a": MAX_COEFFICIENT, "b": -MAX_COEFFICIENT}}})
    assert r.choices and all(math.isfinite(v) for v in r.choices[0].logprobs.token_logprobs)


def test_the_openai_client_gets_a_bad_request_error(server):
    import openai

    c = client(server.port)  # (it refuses to send NaN itself: the raw bodies above are other clients')
    with pytest.raises(openai.BadRequestError, match="merge.weights.a: Input should be less than or equal to 100"):
        c.completions.create(model="base", prompt="1", extra_body={"merge": {"weights": {"a": 1e308}}})
    with pytest.raises(openai.BadRequestError, match="merge.weights.c"):
        c.chat.completions.create(model="base", messages=[{"role": "user", "content": "1"}],
                                  extra_body={"merge": {"weights": {"c": -1e300}}})
    assert c.completions.create(model="base", prompt="1+1=", max_tokens=2, temperature=0).choices


def test_nan_or_absurd_values_inside_a_recipe_are_a_400_naming_the_value(server, recipe):
    group = sorted(recipe["groups"])[0]
    before = server.health()
    for bad, words in (("NaN", ["finite"]), ("Infinity", ["finite"]), ("1e308", ["at most 100"])):
        broken = json.loads(json.dumps(recipe))
        broken["groups"][group]["weight"][0] = "BAD"
        body = json.dumps({"model": "base", "prompt": "1+2=", "max_tokens": 1, "merge": {"recipe": broken}})
        assert_400(post(server, body.replace('"BAD"', bad)), f"merge.recipe.groups.{group}.weight[0]", *words)
    seed = json.dumps({"model": "base", "prompt": "1", "merge": {"recipe": {**recipe, "seed": 2 ** 70}}})
    assert_400(post(server, seed), "merge.recipe.seed")
    after = server.health()
    assert (after["requests"], after["merges"]) == (before["requests"], before["merges"])
    ok = json.dumps({"model": "base", "prompt": "1+2=", "max_tokens": 1, "merge": {"recipe": recipe}})
    assert post(server, ok)[0] == 200


def test_prompts_longer_than_the_context_are_refused_before_the_model(server):
    import openai

    c = client(server.port)
    fits = c.completions.create(model="base", prompt="1" * (CONTEXT - 4), max_tokens=4, temperature=0)
    assert fits.usage.prompt_tokens == CONTEXT - 4  # one token per character: the limit is exact
    full = c.completions.create(model="base", prompt="1" * CONTEXT, temperature=0)  # no max_tokens: what is left
    assert full.usage.completion_tokens == 0 and full.choices[0].finish_reason == "length"
    before = server.health()
    with pytest.raises(openai.BadRequestError, match=f"prompt: {CONTEXT - 3} prompt tokens \\+ max_tokens 4 exceed "
                                                     f"the model's context of {CONTEXT} tokens") as e:
        c.completions.create(model="base", prompt="1" * (CONTEXT - 3), max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError, match=f"prompt: {40 * CONTEXT} prompt tokens exceed"):
        c.completions.create(model="base", prompt="1+2=" * (10 * CONTEXT))
    with pytest.raises(openai.BadRequestError, match="prompt.1: "):  # the long one of a batch: none is answered
        c.completions.create(model="base", prompt=["1+2=", "1" * (CONTEXT + 1)], max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="messages: .* exceed the model's context") as e:
        c.chat.completions.create(model="base", messages=[{"role": "user", "content": "1" * 40},
                                                          {"role": "user", "content": "2" * 20}], max_tokens=4)
    assert e.value.body["param"] == "messages"
    assert server.health()["requests"] == before["requests"]  # none of them reached the model


def test_max_context_overrides_the_models_config(family, tmp_path):  # noqa: F811
    import openai

    with LocalServer("--config", str(family / "serve.yaml"), "--max-context", "8") as srv:
        c = client(srv.port)
        assert c.completions.create(model="base", prompt="1+2=", max_tokens=4).usage.prompt_tokens == 4
        with pytest.raises(openai.BadRequestError, match="context of 8 tokens"):
            c.completions.create(model="base", prompt="1+2=", max_tokens=5)


def serve(family, *args: str, cwd) -> subprocess.CompletedProcess:  # noqa: F811
    return subprocess.run([sys.executable, "-m", "evomerge", "serve", "--config", str(family / "serve.yaml"), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("port", ["99999", "-1"])
def test_a_port_out_of_range_is_one_line(family, tmp_path, port):  # noqa: F811
    r = serve(family, "--port", port, cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [f"error: --port {port}: must lie in 1..65535 (or 0: a free port)"]


@pytest.mark.parametrize("option", ["--max-batch-rows", "--max-batch-tokens"])
def test_a_batch_cap_below_one_is_one_line(family, tmp_path, option):  # noqa: F811
    r = serve(family, option, "0", cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [f"error: {option} 0: must be >= 1"]


def test_a_port_in_use_is_one_line_and_nothing_claims_to_serve(family, tmp_path):  # noqa: F811
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r = serve(family, "--port", str(port), cwd=tmp_path)
    assert r.returncode == 2 and "serving" not in r.stdout
    assert r.stderr.strip().splitlines() == [
        f"error: --port {port}: already in use on 127.0.0.1 (another server?); choose another port"]


def test_a_chat_template_gives_the_prompt_its_token_ids():
    """apply_chat_template(tokenize=True) answers a BatchEncoding in recent transformers: the ids are taken
    from it (its keys are no prompt)."""
    import threading
    from types import SimpleNamespace

    from evomerge.serve.host import ModelHost
    from evomerge.wire import ChatMessage
    from hf_models import tokenizer

    tok = tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}={% endif %}")
    host = SimpleNamespace(rt=SimpleNamespace(tokenizer=tok), tok_lock=threading.Lock())
    ids = ModelHost.chat_prompt(host, [ChatMessage(role="user", content="1+2")])
    assert ids == tok("1+2 =")["input_ids"] and all(isinstance(i, int) for i in ids)
