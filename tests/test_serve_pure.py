"""The serve app's pure parts: request validation (400 naming the field), SSE pieces, the variant catalog
(ids never become paths), bind-address warning. No Ray, no model: milliseconds."""

from __future__ import annotations

import json
import os

import pytest
import torch

from ga_ray.config import ServeConfig
from ga_ray.serve import schema, sse
from ga_ray.serve.catalog import ConflictError, VariantCatalog
from ga_ray.serve.errors import ApiError
from ga_ray.serve.launch import public_bind_warning
from ga_ray.steer import io as variants_io

LIMITS = schema.Limits(max_tokens=100, max_top_logprobs=5, max_prompts=4)


def _completion(**body):
    req = schema.parse_body(json.dumps({"model": "m", "prompt": "hi", **body}).encode(), schema.CompletionRequest)
    return schema.completion_decoding(req, LIMITS)


def _chat(**body):
    req = schema.parse_body(json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}).encode(),
                            schema.ChatCompletionRequest)
    return schema.chat_decoding(req, LIMITS)


@pytest.mark.parametrize("body, param", [
    ({"max_tokens": "5"}, "max_tokens"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 10**9}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": 3}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"logprobs": 6}, "logprobs"),
    ({"logprobs": True}, "logprobs"),
    ({"n": 2}, "n"),
    ({"stop": ["a", ""]}, "stop"),
    ({"stop": 5}, "stop"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": ["a"] * 5}, "prompt"),
    ({"model": 3}, "model"),
    ({"max_tokens": 0}, "max_tokens"),  # 0 only with echo
    ({"presence_penalty": 1.0}, "presence_penalty"),
    ({"seed": "1"}, "seed"),
])
def test_completion_bad_fields_are_400_naming_the_field(body, param):
    with pytest.raises(ApiError) as info:
        _completion(**body)
    assert info.value.status == 400
    assert info.value.param == param
    assert param in info.value.message
    assert info.value.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"top_logprobs": 2}, "top_logprobs"),  # needs logprobs: true
    ({"logprobs": True, "top_logprobs": 9}, "top_logprobs"),
    ({"max_completion_tokens": -3}, "max_completion_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
])
def test_chat_bad_fields_are_400_naming_the_field(body, param):
    with pytest.raises(ApiError) as info:
        _chat(**body)
    assert (info.value.status, info.value.param) == (400, param)


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"", b"\xff\xfe"])
def test_malformed_bodies_are_400(raw):
    with pytest.raises(ApiError) as info:
        schema.parse_body(raw, schema.CompletionRequest)
    assert info.value.status == 400 and info.value.code == "invalid_json"


def test_missing_field_is_named():
    with pytest.raises(ApiError) as info:
        schema.parse_body(b'{"prompt": "x"}', schema.CompletionRequest)
    assert info.value.param == "model" and "Missing" in info.value.message


def test_good_requests_map_to_decoding():
    d = _completion(max_tokens=7, temperature=0, stop="\n", logprobs=2, echo=True, seed=3)
    assert (d.max_tokens, d.temperature, d.stop, d.logprobs, d.echo, d.seed) == (7, 0.0, ("\n",), 2, True, 3)
    assert _completion().max_tokens == 16 and _completion().temperature == 1.0  # OpenAI's defaults
    assert _completion(max_tokens=0, echo=True).max_tokens == 0  # scoring given text
    c = _chat(logprobs=True, top_logprobs=3, max_completion_tokens=9, stream=True, stream_options={"include_usage": True})
    assert (c.logprobs, c.max_tokens, c.stream, c.include_usage) == (3, 9, True, True)
    assert _chat(logprobs=True).logprobs == 0 and _chat().logprobs is None
    req = schema.parse_body(b'{"model": "m", "messages": [{"role": "developer", "content": [{"type": "text", "text": "a"}, '
                            b'{"type": "text", "text": "b"}]}]}', schema.ChatCompletionRequest)
    assert req.chat() == [{"role": "system", "content": "ab"}]


def test_prompt_forms():
    p = lambda v: schema.parse_body(json.dumps({"model": "m", "prompt": v}).encode(), schema.CompletionRequest).prompts()  # noqa: E731
    assert p("ab") == ["ab"]
    assert p([5, 6, 7]) == [[5, 6, 7]]
    assert p(["a", "b"]) == ["a", "b"]
    assert p([[1, 2], [3]]) == [[1, 2], [3]]


def test_context_limits():
    d = _completion(max_tokens=10)
    assert schema.resolve_max_tokens(d, 20, 30, LIMITS, "prompt") == 10
    with pytest.raises(ApiError) as info:
        schema.resolve_max_tokens(d, 21, 30, LIMITS, "prompt")
    assert info.value.param == "max_tokens" and info.value.code == "context_length_exceeded" and "at most 9" in info.value.message
    with pytest.raises(ApiError) as info:
        schema.resolve_max_tokens(d, 31, 30, LIMITS, "messages")
    assert info.value.param == "messages"
    assert schema.resolve_max_tokens(_chat(), 20, 30, LIMITS, "messages") == 10  # chat without max_tokens: what is left
    assert schema.resolve_max_tokens(_completion(max_tokens=0, echo=True), 30, 30, LIMITS, "prompt") == 0


def test_text_pieces_join_to_the_text():
    vocab = {1: "he", 2: "llo", 3: " wor", 4: "ld", 5: "\n"}
    decode = lambda ids: "".join(vocab[i] for i in ids)  # noqa: E731
    assert sse.text_pieces([1, 2, 3, 4], "hello world", decode) == ["he", "llo", " wor", "ld"]
    # cut at a stop string inside the last token: the pieces stop at the cut
    assert "".join(sse.text_pieces([1, 2, 3, 4], "hello wo", decode)) == "hello wo"
    assert sse.text_pieces([], "", decode) == []


def test_sse_chunks_are_openai_events():
    events = list(sse.chat_chunks("id1", 0, "m", ["a", "b"], "stop", {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}))
    assert events[-1] == sse.DONE
    bodies = [json.loads(e[len(b"data: "):]) for e in events[:-1]]
    assert bodies[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(b["choices"][0]["delta"].get("content", "") for b in bodies if b["choices"]) == "ab"
    assert bodies[-2]["choices"][0]["finish_reason"] == "stop" and bodies[-1]["usage"]["total_tokens"] == 3


def _write_variant(vdir, stem, seed):
    g = torch.Generator().manual_seed(seed)
    tensors = {"base_model.model.layers.0.q_proj.lora_A.weight": torch.randn(2, 4, generator=g)}
    return variants_io.write_variant(vdir, stem, tensors, {"r": 2, "peft_type": "LORA"}, {"kind": "atom", "sign": "toward", "alpha": 1.0})


def test_catalog_lists_folders_and_never_turns_ids_into_paths(tmp_path):
    run = tmp_path / "run"
    (run / "variants").mkdir(parents=True)
    (run / "manifest.json").write_text("{}")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    row = _write_variant(run / "variants", "atom1-toward-a1", 0)
    cat = VariantCatalog(run, adapter, refresh_interval_s=0.0)
    assert cat.ids() == ["base", "finetuned", row["name"]]
    assert cat.get(row["name"]).path == (run / "variants" / row["name"]).resolve()
    # a folder outside variants/, reached by a relative id or by a symlink, is never served
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "variant.json").write_text(json.dumps({"name": "secret", "content_hash": "x"}))
    os.symlink(outside, run / "variants" / "secret")
    for bad in ("../secret", "../adapter", str(adapter), "secret", ".", "..", "variants/" + row["name"]):
        assert cat.get(bad) is None, bad
    # an incomplete (dot-prefixed temp) folder is not listed; a new complete one is, without a restart
    (run / "variants" / ".atom2-tmp").mkdir()
    row2 = _write_variant(run / "variants", "atom2-toward-a1", 1)
    assert cat.get(row2["name"]) is not None
    assert cat.ids() == ["base", "finetuned", row["name"], row2["name"]]


def test_catalog_refuses_an_id_whose_content_changed(tmp_path):
    run = tmp_path / "run"
    row = _write_variant(run / "variants", "atom1-toward-a1", 0)
    (run / "manifest.json").write_text("{}")
    cat = VariantCatalog(run, None, refresh_interval_s=0.0)
    assert "finetuned" not in cat.ids()
    meta = run / "variants" / row["name"] / "variant.json"
    data = json.loads(meta.read_text())
    data["content_hash"] = "f" * 64  # same name, other content: a hand-edited or recreated folder
    meta.write_text(json.dumps(data))
    cat.refresh(force=True)
    with pytest.raises(ConflictError, match="never reused"):
        cat.get(row["name"])


def test_default_bind_is_loopback_and_public_bind_warns():
    assert ServeConfig().host == "127.0.0.1"
    assert public_bind_warning("127.0.0.1") is None
    assert "every network interface" in public_bind_warning("0.0.0.0")


def test_serve_command_on_a_missing_run_dir_is_one_red_line(tmp_path):
    from typer.testing import CliRunner

    from ga_ray.cli import app

    result = CliRunner().invoke(app, ["serve", str(tmp_path / "no-such-run")])
    assert result.exit_code == 2
    assert "does not exist" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["serve", str(tmp_path), "--set", "serve.max_batch_size=0"])
    assert result.exit_code == 2 and "max_batch_size" in result.output
