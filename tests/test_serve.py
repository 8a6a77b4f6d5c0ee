"""The serve app over REAL HTTP with the `openai` client: one Serve app per module (tiny Llama, random LoRA
variants written through ga_ray.steer.io), on the session's Ray, on a free port, with an API key.

Checked against local PEFT (PeftModel.from_pretrained + model.generate / a forward pass): greedy answers,
streaming, mixed batches, echo log-probs; then every error case, the bind address, variants added while
serving, overload (503 + Retry-After, every accepted answer its own) and a killed engine replica.
Starting Ray Serve dominates the wall time, hence `slow`.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytestmark = pytest.mark.slow

KEY = "test-key-123"
PROMPTS = ["red green", "cat dog fish", "one two three list", "blue river stone"]


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    from ga_ray.bench.serve import build_tiny_serve_run
    from ga_ray.config import load_config
    from ga_ray.serve.launch import start_local

    world = build_tiny_serve_run(tmp_path_factory.mktemp("serve"), n_variants=3)
    cfg = load_config(None, world["overrides"] + [
        "serve.cpus_per_worker=0.5", "serve.max_batch_size=4", "serve.max_ongoing_requests=4", "serve.max_queued_requests=4",
        "serve.batch_wait_timeout_s=0.05", "serve.refresh_interval_s=0.2", "serve.max_tokens_limit=512"])
    handle = start_local(world["run"], cfg, port=0, api_key=KEY, timeout_s=600)
    try:
        yield world, handle
    finally:
        handle.shutdown()


@pytest.fixture(scope="module")
def local(served):
    """Local references: the tokenizer, and a fresh PEFT model per adapter folder (None: the base model)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    world, _ = served
    tok = AutoTokenizer.from_pretrained(str(world["model"]))
    cache: dict = {}

    def model(path=None):
        if path not in cache:
            m = AutoModelForCausalLM.from_pretrained(str(world["model"]), dtype=torch.float32)
            cache[path] = (PeftModel.from_pretrained(m, str(path)) if path else m).eval()
        return cache[path]

    return tok, model


def _variant_dir(world, name):
    return world["run"] / "variants" / name


def _greedy(tok, model, ids, n):
    with torch.no_grad():
        x = torch.tensor([ids])
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)


def _client(handle, key=KEY):
    from openai import OpenAI

    return OpenAI(base_url=handle.url, api_key=key, max_retries=0, timeout=300)


def _post(handle, path, body, key=KEY, raw=None):
    """(status, headers, JSON body) of a raw POST, for the cases the openai client cannot send."""
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(handle.root + path, data=data, method="POST", headers={"Content-Type": "application/json"})
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, json.loads(exc.read())  # HTTPMessage: case-insensitive names


# ------------------------------------------------------------------------------------------ answers


def test_models_lists_every_variant_plus_finetuned_and_base(served):
    world, handle = served
    ids = [m.id for m in _client(handle).models.list().data]
    assert ids == ["base", "finetuned", *sorted(world["variants"])]


def test_greedy_answers_equal_local_peft_and_differ_from_base(served, local):
    world, handle = served
    tok, model = local
    c = _client(handle)
    base = [c.completions.create(model="base", prompt=p, max_tokens=8, temperature=0).choices[0].text for p in PROMPTS[:2]]
    assert base == [_greedy(tok, model(None), tok(p)["input_ids"], 8) for p in PROMPTS[:2]]
    for name in [*world["variants"][:2], "finetuned"]:
        path = world["adapter"] if name == "finetuned" else _variant_dir(world, name)
        got = [c.completions.create(model=name, prompt=p, max_tokens=8, temperature=0).choices[0].text for p in PROMPTS[:2]]
        assert got == [_greedy(tok, model(path), tok(p)["input_ids"], 8) for p in PROMPTS[:2]], name
        assert got != base, f"{name} answers like the base model: the LoRA is ignored"
    # chat: the chat template renders the prompt, the answer is the variant's
    from ga_ray.engine.protocol import chat_prompt_ids

    name = world["variants"][0]
    msgs = [{"role": "user", "content": "cat dog"}]
    r = c.chat.completions.create(model=name, messages=msgs, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == _greedy(tok, model(_variant_dir(world, name)), chat_prompt_ids(tok, msgs), 8)
    assert r.usage.prompt_tokens == len(chat_prompt_ids(tok, msgs))


def test_streaming_gives_the_same_text(served):
    world, handle = served
    c = _client(handle)
    name = world["variants"][1]
    want = c.completions.create(model=name, prompt=PROMPTS[2], max_tokens=10, temperature=0).choices[0].text
    chunks = list(c.completions.create(model=name, prompt=PROMPTS[2], max_tokens=10, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want
    assert chunks[-1].usage.completion_tokens == 10 or chunks[-1].usage.completion_tokens > 0
    msgs = [{"role": "user", "content": "blue cat"}]
    want = c.chat.completions.create(model=name, messages=msgs, max_tokens=10, temperature=0).choices[0].message.content
    got = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model=name, messages=msgs, max_tokens=10, temperature=0, stream=True) if ch.choices)
    assert got == want


def test_mixed_batch_equals_one_at_a_time(served):
    from ray import serve

    world, handle = served
    c = _client(handle)
    models = ["base", "finetuned", *world["variants"]]
    jobs = [(models[i % len(models)], PROMPTS[i % len(PROMPTS)]) for i in range(8)]
    ask = lambda j: c.completions.create(model=j[0], prompt=j[1], max_tokens=6, temperature=0).choices[0].text  # noqa: E731
    alone = [ask(j) for j in jobs]
    # 8 at once fill the engine's 4 + 4 slots exactly; a slot the router has not yet seen freed answers 503 +
    # Retry-After (seen once in CI), so the concurrent client honours it the way a real client would
    patient = c.with_options(max_retries=10)
    ask_patiently = lambda j: patient.completions.create(  # noqa: E731
        model=j[0], prompt=j[1], max_tokens=6, temperature=0).choices[0].text
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask_patiently, jobs))
    assert together == alone
    info = serve.get_deployment_handle("EngineReplica", app_name="ga-ray").info.remote().result(timeout_s=60)
    assert max(info["batch_sizes"]) > 1, "concurrent requests were never batched"


def test_echo_logprobs_equal_local_log_probs(served, local):
    world, handle = served
    tok, model = local
    name = world["variants"][2]
    prompt = "one two three list table"
    r = _client(handle).completions.create(model=name, prompt=prompt, max_tokens=0, echo=True, logprobs=3)
    ch = r.choices[0]
    assert ch.text == prompt
    ids = tok(prompt)["input_ids"]
    with torch.no_grad():
        logits = model(_variant_dir(world, name))(input_ids=torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    want = [lp[t - 1, ids[t]].item() for t in range(1, len(ids))]
    assert ch.logprobs.token_logprobs[0] is None
    assert ch.logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    assert ch.logprobs.tokens == [tok.decode([i]) for i in ids]
    for t in range(1, len(ids)):  # the best alternative is the model's argmax at that position
        assert max(ch.logprobs.top_logprobs[t].values()) == pytest.approx(lp[t - 1].max().item(), abs=1e-4)
    # echo with generated tokens: prompt tokens then the answer's, text = prompt + answer
    r2 = _client(handle).completions.create(model=name, prompt=prompt, max_tokens=4, echo=True, logprobs=0, temperature=0)
    assert len(r2.choices[0].logprobs.tokens) == len(ids) + r2.usage.completion_tokens
    assert r2.choices[0].text.startswith(prompt)


# ------------------------------------------------------------------------------------------ errors


def test_error_cases_have_status_and_openai_body(served):
    import openai

    world, handle = served
    name = world["variants"][0]
    with pytest.raises(openai.AuthenticationError):
        _client(handle, key="wrong").models.list()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        _client(handle).completions.create(model="no-such-variant", prompt="x", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        _client(handle).completions.create(model="../adapter", prompt="x", max_tokens=2)  # never a path
    ok = {"model": name, "prompt": "red", "max_tokens": 2}
    cases = [
        (None, dict(ok), 401, None),  # no key
        (KEY, {**ok, "max_tokens": "5"}, 400, "max_tokens"),
        (KEY, {**ok, "max_tokens": -1}, 400, "max_tokens"),
        (KEY, {**ok, "max_tokens": 10**9}, 400, "max_tokens"),
        (KEY, {**ok, "prompt": list(range(10, 210))}, 400, "prompt"),  # 200 tokens > context 128
        (KEY, {**ok, "prompt": list(range(10, 110)), "max_tokens": 50}, 400, "max_tokens"),  # 100 + 50 > 128
        (KEY, {**ok, "prompt": [999999]}, 400, "prompt"),  # token id outside the vocabulary
        (KEY, {**ok, "temperature": "warm"}, 400, "temperature"),
        (KEY, {"model": name, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
        (KEY, {**ok, "model": "nope"}, 404, "model"),
    ]
    for key, body, status, param in cases:
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        code, _, got = _post(handle, path, body, key=key)
        assert code == status, (body, got)
        err = got["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        assert err["param"] == param, (body, err)
    code, _, got = _post(handle, "/v1/completions", None, raw=b"{not json")
    assert code == 400 and "not valid JSON" in got["error"]["message"]
    code, _, got = _post(handle, "/v1/nothing-here", {})
    assert code == 404 and "error" in got


def test_binds_loopback_by_default(served):
    import ray

    _, handle = served
    assert handle.host == "127.0.0.1"
    ip = ray.util.get_node_ip_address()
    if ip.startswith("127."):
        pytest.skip("this machine has no non-loopback address to try")
    with socket.socket() as s:
        s.settimeout(5)
        with pytest.raises(OSError):
            s.connect((ip, handle.port))


# ------------------------------------------------------------------------------------------ live


def test_a_variant_written_while_serving_is_listed_and_served(served, local):
    from ga_ray.bench.serve import random_lora, write_lora_variant

    world, handle = served
    tok, model = local
    name = write_lora_variant(random_lora(world["model_config"], seed=4242), world["run"], "random99-toward-a1", 99)
    c = _client(handle)
    deadline = time.monotonic() + 30
    while name not in [m.id for m in c.models.list().data]:
        assert time.monotonic() < deadline, f"{name} never appeared in /v1/models"
        time.sleep(0.3)
    got = c.completions.create(model=name, prompt=PROMPTS[0], max_tokens=8, temperature=0).choices[0].text
    assert got == _greedy(tok, model(_variant_dir(world, name)), tok(PROMPTS[0])["input_ids"], 8)


def test_overload_gets_503_and_every_accepted_request_its_own_answer(served):
    world, handle = served
    name = world["variants"][0]

    def ask(i):
        prompt = f"marker{i} red green"
        return i, prompt, _post(handle, "/v1/completions", {"model": name, "prompt": prompt, "max_tokens": 48, "echo": True,
                                                            "temperature": 0})

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(ask, range(32)))
    ok = [r for r in results if r[2][0] == 200]
    busy = [r for r in results if r[2][0] == 503]
    assert len(ok) + len(busy) == len(results), [r[2][0] for r in results]
    assert busy, "32 simultaneous requests against 4 running + 4 queued were all accepted: the queue is not bounded"
    assert len(ok) >= 4
    for _, prompt, (_, _, body) in ok:  # no answer is mis-routed: each echoes its own marker
        assert body["choices"][0]["text"].startswith(prompt)
    for _, _, (_, headers, body) in busy:
        assert int(headers.get("Retry-After")) >= 0 and body["error"]["code"] == "overloaded"


def _wait_until_answered(handle, name, timeout_s=300):
    deadline = time.monotonic() + timeout_s
    while True:  # Serve starts a new replica: new requests succeed
        code, _, body = _post(handle, "/v1/completions", {"model": name, "prompt": "after", "max_tokens": 4, "echo": True})
        if code == 200:
            assert body["choices"][0]["text"].startswith("after")
            return
        assert code == 503 and time.monotonic() < deadline, body
        time.sleep(1)


def test_killed_engine_replica_fails_in_flight_requests_cleanly_and_recovers(served):
    import ray

    world, handle = served
    name = world["variants"][1]

    def kill_under_load() -> list[int]:
        """Statuses of the requests answered after the replica was killed under load from 4 clients."""
        statuses: list[int] = []
        stop = threading.Event()

        def load(w):
            i = 0
            while not stop.is_set():
                i += 1
                prompt = f"w{w}n{i} cat"
                # long answers, so that most of a request's life is inside the engine replica
                code, _, body = _post(handle, "/v1/completions", {"model": name, "prompt": prompt, "max_tokens": 100, "echo": True})
                statuses.append(code)
                assert code in (200, 503), body  # never a 500, never a hang
                if code == 200:
                    assert body["choices"][0]["text"].startswith(prompt)
                else:
                    assert body["error"]["type"] == "service_unavailable"

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(load, w) for w in range(4)]
            deadline = time.monotonic() + 120
            while len(statuses) < 4 and time.monotonic() < deadline:  # answered a few times: warm, under load
                time.sleep(0.1)
            time.sleep(0.5)
            replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "EngineReplica" in a["name"]]
            assert len(replicas) == 1, replicas
            killed_at = len(statuses)  # before the kill: a request that fails with it can answer before ray.kill returns
            ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
            time.sleep(3)
            stop.set()
            for f in futures:
                f.result(timeout=600)
        return statuses[killed_at:]

    # The kill is asynchronous: now and then every request in flight finishes before the process dies and the
    # next ones wait for the new replica (all 200, seen in CI). So kill again, up to 3 times, until one is caught.
    seen = []
    for _ in range(3):
        after = kill_under_load()
        seen.append(after)
        _wait_until_answered(handle, name)
        if 503 in after:
            break
    assert 503 in seen[-1], f"no request in flight failed in 3 kills; statuses after each kill: {seen}"
