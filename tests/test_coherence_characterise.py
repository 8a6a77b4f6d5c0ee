"""Characterisation: excerpts, characteristic words, and the labeller against a real local HTTP server."""

from __future__ import annotations

import contextlib
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ga_ray.coherence.characterise import (
    Decoder,
    characterise_atoms,
    chat_completions_url,
    clean_label,
    label_atoms,
    log_odds_keywords,
    request_label,
    split_prompt_response,
    word_counts,
)


def test_split_prompt_response_follows_loss_mask():
    p, r = split_prompt_response([5, 6, 7, 8, 9], [0, 0, 1, 1, 0])
    assert p == [5, 6, 9] and r == [7, 8]
    assert Decoder(None)(r) == "t7 t8"


def test_log_odds_ranks_the_over_represented_word_first():
    corpus = word_counts(["the cat sat on the mat"] * 50 + ["yes the answer is yes"] * 5)
    target = word_counts(["yes the answer is yes"] * 5)
    kw = log_odds_keywords(target, corpus, top=3)
    assert kw[0][0] == "yes" and kw[0][1] > 0
    assert "the" not in [w for w, _ in kw]  # common everywhere: not characteristic
    assert log_odds_keywords(Counter(), corpus) == []
    # an over-represented function word is still not a keyword; a number is
    target = word_counts(["the answer is the four"] * 5)
    kw = [w for w, _ in log_odds_keywords(target, corpus + target, top=5)]
    assert "the" not in kw and "is" not in kw and "four" in kw


def test_characterise_atoms_with_token_ids():
    docs = {1: ([3, 4, 10, 11], [0, 0, 1, 1]), 2: ([3, 5, 10, 12], [0, 0, 1, 1]), 3: ([3, 4, 20, 21], [0, 0, 1, 1])}
    bg = [Decoder(None)(split_prompt_response(*docs[d])[1]) for d in docs] * 5
    out = characterise_atoms([[1, 2], [3]], docs, bg, Decoder(None), n_examples=1, excerpt_chars=50, n_keywords=2)
    assert out[0]["examples"] == [{"doc_id": 1, "prompt": "t3 t4", "response": "t10 t11"}]
    assert out[0]["keywords"][0] == "t10"  # shared by both top responses


def test_url_and_label_cleaning():
    assert chat_completions_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert clean_label('Label: "Yes/no questions"\nmore') == "Yes/no questions"


class _Handler(BaseHTTPRequestHandler):
    requests: list = []

    def do_POST(self):  # noqa: N802 (http.server API)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        user = body["messages"][-1]["content"]
        if "FAIL" in user:
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b"boom")
            return
        answer = {"choices": [{"message": {"role": "assistant", "content": "**Arithmetic answers**\nbecause ..."}}]}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # keep the test output clean
        pass


@contextlib.contextmanager
def serve():
    """A real HTTP server on 127.0.0.1 (a free port) in a thread; yields its base URL."""
    _Handler.requests = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        t.join(timeout=5)


@pytest.fixture()
def server():
    with serve() as url:
        yield url


def test_labeller_against_a_local_server(server, monkeypatch):
    monkeypatch.setenv("GA_RAY_TEST_KEY", "secret-token")
    info = {7: {"examples": [{"doc_id": 1, "prompt": "2+2?", "response": "4"}], "keywords": ["4", "sum"]}}
    res = label_atoms(info, [7], server, "tiny-model", timeout_s=5, api_key_env="GA_RAY_TEST_KEY")
    assert res[7]["label"] == "Arithmetic answers" and res[7]["error"] is None
    assert info[7]["label"] == "Arithmetic answers"
    assert "2+2?" in info[7]["label_request"]["prompt"] and "Arithmetic" in info[7]["label_request"]["raw"]
    req = _Handler.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["body"]["model"] == "tiny-model"
    assert req["auth"] == "Bearer secret-token"
    assert "sum" in req["body"]["messages"][-1]["content"]


def test_labeller_keeps_errors(server):
    res = request_label(server, "m", "please FAIL", timeout_s=5, retries=1)
    assert res["label"] is None and res["error"].startswith("HTTP 500") and res["raw"] == "boom"
    assert len(_Handler.requests) == 2  # a 5xx is retried once
    # nothing listening: a connection error, kept, not raised
    dead = request_label("http://127.0.0.1:9", "m", "x", timeout_s=2, retries=0)
    assert dead["label"] is None and dead["error"]
