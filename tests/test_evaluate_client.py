"""The evaluation client over real HTTP (a small OpenAI-shaped server in a thread): failures are retried, then
counted, never dropped; a killed evaluation resumes without redoing any finished request."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ga_ray.evaluate import io
from ga_ray.evaluate.client import ClientSettings, CompletionJob, run_jobs
from ga_ray.evaluate.stage import run_pending

TIMEOUT = 60


class _Server:
    """POST /v1/completions: model `down` always answers 500, `gone` 404, `flaky` fails twice per prompt then
    answers; others answer `len=<prompt length>` after `delay` seconds. Every request is recorded."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.requests: list[tuple[str, tuple]] = []
        self.lock = threading.Lock()
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                model = body["model"]
                prompt = tuple(tuple(p) if isinstance(p, list) else p for p in body["prompt"])
                with outer.lock:
                    outer.requests.append((model, prompt))
                    seen = sum(1 for m, p in outer.requests if m == model and p == prompt)
                if model == "down" or (model == "flaky" and seen <= 2):
                    return self._send(500, {"error": {"message": "boom", "type": "server_error"}})
                if model == "gone":
                    return self._send(404, {"error": {"message": f"model {model} not found", "type": "not_found"}})
                time.sleep(outer.delay)
                many = bool(prompt) and isinstance(prompt[0], tuple)
                prompts = list(prompt) if many else [prompt]
                choices = [{"index": i, "text": f"len={len(p)}", "finish_reason": "stop", "logprobs": None} for i, p in enumerate(prompts)]
                self._send(200, {"id": "x", "object": "text_completion", "created": 0, "model": model, "choices": choices[::-1],
                                 "usage": {"prompt_tokens": 1, "completion_tokens": len(prompts), "total_tokens": 1 + len(prompts)}})

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _jobs(model: str, n: int) -> list[CompletionJob]:
    return [CompletionJob(key=(model, f"item{i:03d}"), model=model, prompt=list(range(1, i + 2)), max_tokens=4) for i in range(n)]


@pytest.mark.timeout(TIMEOUT)
def test_a_failed_request_is_retried_then_counted_as_a_failure():
    with _Server() as srv:
        s = ClientSettings(srv.url, concurrency=4, retries=2, backoff_s=0.01, timeout_s=10)
        res = run_jobs(_jobs("down", 3) + _jobs("ok", 3) + _jobs("flaky", 2) + _jobs("gone", 1), s)
    assert len(res) == 9  # every request accounted for
    by = {r.key: r for r in res}
    for i in range(3):
        r = by[("down", f"item{i:03d}")]
        assert r.error and "500" in r.error and r.text is None and r.attempts == 3
        assert by[("ok", f"item{i:03d}")].text == f"len={i + 1}" and by[("ok", f"item{i:03d}")].error is None
    assert all(by[("flaky", f"item{i:03d}")].text and by[("flaky", f"item{i:03d}")].attempts == 3 for i in range(2))
    assert by[("gone", "item000")].error and by[("gone", "item000")].attempts == 1  # a 404 is not retried
    assert sum(1 for m, _ in srv.requests if m == "gone") == 1


@pytest.mark.timeout(TIMEOUT)
def test_failed_requests_count_in_the_stage_rows(tmp_path):
    """A failure lands in the store as a row with an error (a miss in every rate), and is retried on resume."""
    store = io.PartStore(tmp_path / "gen", chunk_rows=2)
    with _Server() as srv:
        s = ClientSettings(srv.url, concurrency=2, retries=0, backoff_s=0.0, timeout_s=10)
        skipped = run_pending(_jobs("down", 2) + _jobs("ok", 2), store, s, _row)
        assert skipped == 0
        rows = store.rows()
        assert len(rows) == 4 and sum(1 for r in rows if r["error"]) == 2
        assert store.done_keys() == {("ok", "item000"), ("ok", "item001")}
        n_before = len(srv.requests)
        assert run_pending(_jobs("down", 2) + _jobs("ok", 2), store, s, _row) == 2  # the successes are not redone
        assert sorted(m for m, _ in srv.requests[n_before:]) == ["down", "down"]


@pytest.mark.timeout(TIMEOUT)
def test_prompts_grouped_per_request_equal_one_per_request():
    from ga_ray.evaluate.client import group_jobs

    jobs = _jobs("ok", 7) + _jobs("down", 3) + _jobs("ok", 2)
    assert [len(g) for g in group_jobs(jobs, 3)] == [3, 3, 1, 3, 2]  # never across models
    with _Server() as srv:
        one = run_jobs(jobs, ClientSettings(srv.url, concurrency=2, retries=0, timeout_s=10))
        grouped = run_jobs(jobs, ClientSettings(srv.url, concurrency=2, retries=0, timeout_s=10, prompts_per_request=3))
    assert [r.key for r in grouped] == [j.key for j in jobs]  # every job accounted for, in order
    assert [(r.text, bool(r.error)) for r in grouped] == [(r.text, bool(r.error)) for r in one]
    assert sum(1 for r in grouped if r.error) == 3  # a failed group fails each of its jobs


def _row(r):
    return {"variant": r.key[0], "item": r.key[1], "response": r.text, "latency_s": r.latency_s, "error": r.error}


_CHILD = """
import sys
from ga_ray.evaluate import io
from ga_ray.evaluate.client import ClientSettings, CompletionJob
from ga_ray.evaluate.stage import run_pending
url, folder, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
jobs = [CompletionJob(key=("ok", f"item{i:03d}"), model="ok", prompt=list(range(1, i + 2)), max_tokens=4) for i in range(n)]
store = io.PartStore(folder, chunk_rows=5)
run_pending(jobs, store, ClientSettings(url, concurrency=2, retries=0, timeout_s=10),
            lambda r: {"variant": r.key[0], "item": r.key[1], "response": r.text, "latency_s": r.latency_s, "error": r.error})
"""


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT)
def test_resume_after_a_kill_regenerates_nothing_done(tmp_path):
    folder = tmp_path / "gen"
    n = 200
    with _Server(delay=0.02) as srv:
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        child = subprocess.Popen([sys.executable, "-c", _CHILD, srv.url, str(folder), str(n)], env=env)
        try:
            deadline = time.monotonic() + TIMEOUT / 2
            while time.monotonic() < deadline and len(list(folder.glob("part-*.parquet"))) < 3:
                time.sleep(0.05)
            child.send_signal(signal.SIGKILL)  # a hard kill: no cleanup, no flush
        finally:
            child.wait(timeout=10)
        before = {(r["variant"], r["item"]): r for r in io.PartStore(folder).rows()}
        assert 15 <= len(before) < n, "the child should have been killed mid-way"
        n_requests = len(srv.requests)
        store = io.PartStore(folder, chunk_rows=5)
        jobs = [CompletionJob(key=("ok", f"item{i:03d}"), model="ok", prompt=list(range(1, i + 2)), max_tokens=4) for i in range(n)]
        skipped = run_pending(jobs, store, ClientSettings(srv.url, concurrency=8, retries=0, timeout_s=10), _row)
        after_kill = srv.requests[n_requests:]
    assert skipped == len(before)
    asked_again = {p for _, p in after_kill}
    assert not asked_again & {tuple(range(1, int(k[1][4:]) + 2)) for k in before}  # nothing done is asked again
    final = {(r["variant"], r["item"]): r for r in store.rows()}
    assert set(final) == {j.key for j in jobs}
    for k, r in before.items():  # the rows from before the kill are the very rows kept
        assert final[k]["latency_s"] == r["latency_s"]
    assert not any(p.name.startswith(".") and p.suffix == ".parquet" for p in folder.iterdir() if p.name.startswith("part"))
