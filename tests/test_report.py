"""The report: every section from a small fixture run, absent sections said, a self-contained page
that headless Chromium renders with every figure decoded and no console error."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ga_ray.coherence import io as coherence_io
from ga_ray.coherence.discovery import Families, discovery_scores
from ga_ray.report.stage import build_report

SECTIONS = ("coherence", "atoms", "sweep", "discovery", "format_table", "metrics")


def make_fixture_run(root: Path, K: int = 60, N: int = 120, with_labels: bool = True, with_sweep: bool = True) -> Path:
    """A run directory holding the artifacts the report reads (no Ray, no model: built directly)."""
    rng = np.random.default_rng(0)
    atoms = root / "atoms"
    coherence = root / "coherence"
    report = root / "report"
    atoms.mkdir(parents=True)
    coherence.mkdir()
    report.mkdir()
    coh = np.clip(rng.beta(1.2, 6.0, size=K), 0, 1)
    coh[:3] = [0.72, 0.61, 0.55]
    coh[K - 2 :] = np.nan  # atoms without two positive documents
    fams = np.array(["arith", "yesno", "code", "list"])[rng.integers(0, 4, size=N)]
    code_doc, code_atom, code_coef = [], [], []
    top_ids = []
    for k in range(K):
        docs = rng.choice(N, size=int(rng.integers(2, 25)), replace=False)
        vals = rng.uniform(0.05, 1.0, size=len(docs))
        code_doc += docs.tolist()
        code_atom += [k] * len(docs)
        code_coef += vals.tolist()
        order = np.lexsort((docs, -vals))
        top_ids.append(docs[order][:20].tolist())
    coherence_io.save_atom_table(
        coherence,
        pa.table(
            {
                "atom": pa.array(np.arange(K, dtype=np.int32)),
                "coherence": pa.array(coh),
                "n_active_docs": pa.array([len(t) for t in top_ids], pa.int64()),
                "n_positive_docs": pa.array([len(t) for t in top_ids], pa.int64()),
                "top_doc_ids": pa.array(top_ids, pa.list_(pa.int64())),
                "top_coefs": pa.array([[1.0] * len(t) for t in top_ids], pa.list_(pa.float32())),
                "sign_flipped": pa.array([k % 3 == 0 for k in range(K)]),
                "coef_sum": pa.array([float(len(t)) for t in top_ids]),
                "n_invalid_top_docs": pa.array([0] * K, pa.int64()),
            }
        ),
    )
    char = {
        "tokenizer": "fixture",
        "background_docs": N,
        "labels": {"requested": 1, "ok": 1, "errors": 0},
        "atoms": {
            str(k): {
                "examples": [{"doc_id": int(d), "prompt": f"What is {d} + {d}? <b>not bold</b>", "response": f"{2 * d} & done"} for d in top_ids[k][:5]],
                "keywords": ["sum", "plus", str(k)],
                **({"label": "Simple arithmetic"} if k == 0 else {}),
            }
            for k in range(K)
        },
    }
    coherence_io.save_characterisation(coherence, char)
    (atoms / "metrics.json").write_text(json.dumps({"objective": 0.4123, "fvu": 0.61, "l0": {"mean": 3.2, "median": 3, "p99": 9}, "dead_atoms": 2, "wall_time_s": {"fit": 12.5}}))
    if with_labels:
        km = (np.arange(N), rng.integers(0, 4, size=N), None)
        disc = discovery_scores(Families(np.arange(N), fams.astype(object)), np.array(code_doc), np.array(code_atom), np.array(code_coef), K, top_ids, coh, kmeans=km)
        disc["label_column"] = "task"
        coherence_io.save_discovery(coherence, disc)
    if with_sweep:
        rows = [
            {"alpha": a, "n_atoms": K, "dead_atoms": d, "median_docs_per_atom": m, "mean_docs_per_atom": m, "atoms_coherence_gt_0.5": h, "atoms_coherence_gt_0.1": l, "atoms_scored": K, "mean_l0": m / 10, "objective": 0.4, "fit_s": 1.0, "coherence_s": 2.0}
            for a, d, m, h, l in ((0.01, 0, 80.0, 0, 3), (0.1, 2, 12.0, 3, 14), (1.0, K, 0.0, 0, 0))
        ]
        (report / "sweep.json").write_text(json.dumps({"rows": rows}))
    # the finetune stage's format table: base model and fine-tuned model, scored from hand-made responses
    from ga_ray.demo.formats import FORMAT_CHECKS
    from ga_ray.finetune.format_table import compute_format_table

    ev = {"families": {"arithmetic": [{"prompt": "p"}] * 4},
          "behaviours": {"bullets": [{"prompt": "p", "invites": True}] * 3 + [{"prompt": "p", "invites": False}] * 2}}
    (root / "adapter").mkdir()
    (root / "adapter" / "format_table.json").write_text(json.dumps(compute_format_table(
        ev, {"families": {"arithmetic": ["2 + 2 = 4"] * 4}, "behaviours": {"bullets": ["- a\n- b", "- a", "x", "y", "z"]}}, FORMAT_CHECKS)))
    (root / "adapter" / "format_table_base.json").write_text(json.dumps(compute_format_table(
        ev, {"families": {"arithmetic": ["four", "2 + 2 = 4", "x", "y"]}, "behaviours": {"bullets": ["no"] * 5}}, FORMAT_CHECKS)))
    manifest = {
        "stages": {
            "atoms": {"status": "done", "wall_time_s": 12.9, "finished_at": "2026-01-01T00:00:00+00:00", "summary": {"line": "60 atoms"}, "versions": {"python": "3.11", "ray": "2.60.0"}},
            "coherence": {"status": "done", "wall_time_s": 30.2, "summary": {"line": "3 atoms > 0.5"}},
        }
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _section(html: str, anchor: str) -> str:
    m = re.search(rf'<section id="{anchor}">(.*?)</section>', html, re.S)
    assert m, f"section {anchor} missing"
    return m.group(1)


def test_report_has_every_section_and_is_self_contained(tmp_path):
    from PIL import Image

    run = make_fixture_run(tmp_path / "run")
    res = build_report(run, top_atoms=50)
    html = Path(res["html"]).read_text()
    assert all(res["sections"][s] for s in SECTIONS)
    for s in SECTIONS:
        assert 'class="absent"' not in _section(html, s), s
    # Figure 1, table 4 layout, sweep, discovery, metrics
    assert "coherence &gt; 0.5" in _section(html, "coherence") or "coherence > 0.5" in _section(html, "coherence")
    atoms = _section(html, "atoms")
    for head in ("Rank", "Atom", "Coherence", "Active docs", "Label / keywords", "Example documents"):
        assert f"<th>{head}</th>" in atoms
    assert atoms.count("<tr>") == 1 + 50  # header + top 50 (of 58 scored atoms)
    assert "<strong>Simple arithmetic</strong>" in atoms and "0.720" in atoms
    assert "&lt;b&gt;not bold&lt;/b&gt;" in atoms and "<b>not bold</b>" not in atoms  # excerpts escaped
    first = re.search(r"<tbody><tr>(.*?)</tr>", atoms, re.S).group(1)
    assert first.count('class="ex"') == 2  # two example documents
    assert "0.01" in _section(html, "sweep") and "k-means" in _section(html, "discovery")
    assert "dominant atom only" in _section(html, "discovery")
    assert "objective" in _section(html, "metrics") and "coherence" in _section(html, "metrics")
    fmt_rows = re.findall(r"<tr>(.*?)</tr>", _section(html, "format_table"), re.S)
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", r) for r in fmt_rows]
    assert ["arithmetic", "25%", "100%"] == [cells[1][0], cells[1][2], cells[1][3]]  # family, base, fine-tuned
    assert ["bullets", "0%", "20%", "33%", "0%", "ok"] == [cells[3][i] for i in (0, 1, 2, 4, 5, 7)]
    # self-contained: every image is a data URI, nothing external
    srcs = re.findall(r'src="([^"]*)"', html)
    assert len(srcs) == 3 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r'(href|src)="(https?:)?//', html) and "<script" not in html
    # the PNGs are next to it and decode; the embedded ones are the same bytes
    assert sorted(res["figures"]) == ["coherence_histogram.png", "discovery_f1.png", "sweep.png"]
    embedded = {base64.b64decode(s.split(",", 1)[1]) for s in srcs}
    for f in res["figures"]:
        data = (run / "report" / f).read_bytes()
        assert data in embedded
        im = Image.open(io.BytesIO(data))
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def test_report_without_optional_artifacts_says_so(tmp_path):
    run = make_fixture_run(tmp_path / "run", with_labels=False, with_sweep=False)
    res = build_report(run)
    html = Path(res["html"]).read_text()
    assert res["sections"]["discovery"] is False and res["sections"]["sweep"] is False
    assert "no label column" in _section(html, "discovery")
    assert "ga-ray sweep" in _section(html, "sweep")
    assert 'class="absent"' not in _section(html, "atoms")
    # nothing at all: still a page, every section says what is missing
    empty = tmp_path / "empty"
    empty.mkdir()
    res = build_report(empty)
    html = Path(res["html"]).read_text()
    for s in SECTIONS:
        assert 'class="absent"' in _section(html, s), s
    assert res["figures"] == []


def test_run_report_stage_through_the_pipeline(tmp_path):
    """The stage function through the runner's StageContext (the report entry's declared config view); the runner's
    upstream checks are not used: the fixture run has artifacts but no manifest records for them."""
    from ga_ray.config import load_config
    from ga_ray.pipeline import StageContext
    from ga_ray.report.stage import run_report
    from ga_ray.rundir import RunDir

    run = make_fixture_run(tmp_path / "run")
    cfg = load_config(None, ["report.top_atoms=5", "name=fixture"])
    out = run_report(StageContext(cfg=cfg, run_dir=RunDir(run), stage="report", out=run / "report"))
    html = (run / "report" / "report.html").read_text()
    assert "Gradient Atoms report: fixture" in html and "Top 5 atoms" in html
    assert out["line"].startswith(f"{run / 'report' / 'report.html'} (3 figures")  # "; without ..." names the sections this fixture lacks


# ------------------------------------------------------------------------------ headless Chromium


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


async def _devtools_check(port: int, url: str, timeout: float = 60.0) -> dict:
    """Open `url` in a page target over the DevTools websocket; collect console errors and image sizes."""
    import asyncio

    import aiohttp

    errors: list[str] = []
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
            targets = await r.json()
        page = next(t for t in targets if t.get("type") == "page")
        async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            next_id = 0
            pending: dict[int, asyncio.Future] = {}
            loaded = asyncio.Event()

            async def reader():
                async for msg in ws:
                    data = json.loads(msg.data)
                    if "id" in data and data["id"] in pending:
                        pending.pop(data["id"]).set_result(data)
                        continue
                    method, params = data.get("method"), data.get("params", {})
                    if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                        errors.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
                    elif method == "Runtime.exceptionThrown":
                        errors.append("exception: " + json.dumps(params.get("exceptionDetails", {}))[:500])
                    elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                        errors.append("log: " + params["entry"].get("text", ""))
                    elif method == "Page.loadEventFired":
                        loaded.set()

            async def call(method: str, **params):
                nonlocal next_id
                next_id += 1
                fut = asyncio.get_running_loop().create_future()
                pending[next_id] = fut
                await ws.send_str(json.dumps({"id": next_id, "method": method, "params": params}))
                res = await asyncio.wait_for(fut, timeout)
                if "error" in res:
                    raise RuntimeError(f"{method}: {res['error']}")
                return res["result"]

            task = asyncio.create_task(reader())
            for domain in ("Runtime.enable", "Log.enable", "Page.enable"):
                await call(domain)
            await call("Page.navigate", url=url)
            await asyncio.wait_for(loaded.wait(), timeout)
            js = (
                "Promise.all(Array.from(document.images).map(i => i.decode().then(() => [i.alt, i.naturalWidth, i.naturalHeight])"
                ".catch(e => [i.alt, 0, 0, String(e)])))"
            )
            res = await call("Runtime.evaluate", expression=js, awaitPromise=True, returnByValue=True)
            images = res["result"]["value"]
            title = (await call("Runtime.evaluate", expression="document.title", returnByValue=True))["result"]["value"]
            sections = (await call("Runtime.evaluate", expression="document.querySelectorAll('section').length", returnByValue=True))["result"]["value"]
            await asyncio.sleep(0.3)  # late console messages
            task.cancel()
    return {"errors": errors, "images": images, "title": title, "sections": sections}


def _open_in_chromium(html_path: Path, tmp_path: Path) -> dict:
    import asyncio

    exe = _chromium()
    if exe is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("chromium is not installed, but CI must run this test (apt-get install -y chromium)")
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    profile = tmp_path / f"profile-{html_path.stem}"
    profile.mkdir()
    cmd = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--remote-debugging-port=0",
        "--remote-allow-origins=*",
        "about:blank",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None:
                pytest.fail(f"chromium exited with {proc.returncode}: {proc.stderr.read().decode(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("chromium did not open its DevTools port within 60 s")
            time.sleep(0.1)
        port = int(port_file.read_text().splitlines()[0])
        return asyncio.run(_devtools_check(port, html_path.resolve().as_uri()))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_report_renders_in_headless_chromium(tmp_path):
    run = make_fixture_run(tmp_path / "run")
    res = build_report(run)
    out = _open_in_chromium(Path(res["html"]), tmp_path)
    assert out["errors"] == []
    assert out["title"].startswith("Gradient Atoms report")
    assert out["sections"] == len(SECTIONS) + 2  # + the groups and steering sections (their "absent" notes in this fixture)
    assert len(out["images"]) == 3
    for alt, w, h, *err in out["images"]:
        assert w > 0 and h > 0, (alt, err)


def test_chromium_check_catches_broken_images_and_console_errors(tmp_path):
    """Negative control: the same check on a page with a broken figure and a console error fails."""
    bad = tmp_path / "bad.html"
    bad.write_text(
        '<!DOCTYPE html><html><head><link rel="icon" href="data:,"><title>bad</title></head><body>'
        '<img alt="broken" src="data:image/png;base64,AAAA"><script>console.error("boom")</script></body></html>'
    )
    out = _open_in_chromium(bad, tmp_path)
    assert any("boom" in e for e in out["errors"])
    assert out["images"][0][1] == 0
