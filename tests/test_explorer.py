"""The atom explorer in a real headless Chromium (driven over the DevTools protocol): the table renders
from the embedded data, search filters it, selecting an atom shows its documents, its group and its
neighbours, a group shows its members, a steering curve is drawn once eval/metrics.parquet exists, and
the console stays clean. The page works from file:// (nothing is fetched)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ga_ray.report.explorer import build_explorer, explorer_data, steering_curves
from test_groups import _run_stage, constructed_world, make_stage_run


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


class Page:
    """A tiny DevTools-protocol client: evaluate JavaScript, collect console errors and failed requests."""

    def __init__(self, ws, loop_errors: list[str]):
        self.ws = ws
        self.errors = loop_errors
        self.next_id = 0
        self.pending: dict[int, asyncio.Future] = {}
        self.loaded = asyncio.Event()

    async def reader(self):
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self.pending:
                self.pending.pop(data["id"]).set_result(data)
                continue
            method, params = data.get("method"), data.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert", "warning"):
                self.errors.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
                                   + " at " + json.dumps([(f.get("functionName"), f.get("lineNumber"), f.get("columnNumber")) for f in params.get("stackTrace", {}).get("callFrames", [])][:8]))
            elif method == "Runtime.exceptionThrown":
                self.errors.append("exception: " + json.dumps(params.get("exceptionDetails", {}))[:800])
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                self.errors.append("log: " + params["entry"].get("text", ""))
            elif method == "Network.requestWillBeSent" and not params.get("request", {}).get("url", "").startswith(("file:", "data:", "about:")):
                self.errors.append("network: " + params["request"]["url"])
            elif method == "Page.loadEventFired":
                self.loaded.set()

    async def call(self, method: str, timeout: float = 60.0, **params):
        self.next_id += 1
        fut = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = fut
        await self.ws.send_str(json.dumps({"id": self.next_id, "method": method, "params": params}))
        res = await asyncio.wait_for(fut, timeout)
        if "error" in res:
            raise RuntimeError(f"{method}: {res['error']}")
        return res["result"]

    async def js(self, expression: str):
        res = await self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"JS error in {expression!r}: {res['exceptionDetails']}")
        return res["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = await self.js(expression)
            if v:
                return v
            await asyncio.sleep(0.1)
        raise AssertionError(f"timed out waiting for {expression}")


def drive(html: Path, tmp_path: Path, scenario, screenshot: Path | None = None):
    """Open `html` in headless Chromium and run `scenario(page)` (an async function); returns (its result, errors)."""
    import aiohttp

    exe = _chromium()
    if exe is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("chromium is not installed, but CI must run this test (apt-get install -y chromium)")
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    profile = tmp_path / f"profile-{html.stem}-{time.monotonic_ns()}"
    profile.mkdir()
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--no-first-run", "--disable-dev-shm-usage", "--window-size=1400,1000", f"--user-data-dir={profile}", "--remote-debugging-port=0",
           "--remote-allow-origins=*", "about:blank"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    async def main(port: int):
        errors: list[str] = []
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                targets = await r.json()
            target = next(t for t in targets if t.get("type") == "page")
            async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                page = Page(ws, errors)
                task = asyncio.create_task(page.reader())
                try:
                    for domain in ("Runtime.enable", "Log.enable", "Page.enable", "Network.enable"):
                        await page.call(domain)
                    await page.call("Page.navigate", url=html.resolve().as_uri())
                    await asyncio.wait_for(page.loaded.wait(), 60)
                    result = await scenario(page)
                    if screenshot is not None:
                        shot = await page.call("Page.captureScreenshot", format="png")
                        screenshot.write_bytes(base64.b64decode(shot["data"]))
                    await asyncio.sleep(0.3)  # late console messages
                finally:
                    task.cancel()
        return result, errors

    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None:
                pytest.fail(f"chromium exited with {proc.returncode}: {proc.stderr.read().decode(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("chromium did not open its DevTools port within 60 s")
            time.sleep(0.1)
        return asyncio.run(asyncio.wait_for(main(int(port_file.read_text().splitlines()[0])), 180))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


VISIBLE = "document.getElementById('table')"
ROWS = f"{VISIBLE}.querySelectorAll('.gridjs-tbody .gridjs-tr').length"


def _fixture_run(tmp_path: Path, with_metrics: bool) -> Path:
    w = constructed_world(seed=7)
    root = make_stage_run(tmp_path / "run", w, with_label=False)
    _run_stage(root)
    K = w["K"]
    tops = pq.read_table(root / "atoms" / "atoms.parquet").column("top_doc_ids").to_pylist()
    char = {"atoms": {str(k): {"keywords": [f"word{k}", "shared"], "label": "Answers yes or no" if k == 3 else None,
                               "examples": [{"doc_id": d, "prompt": f"Prompt of document {d} <script>alert(1)</script>", "response": f"Response {d} for atom {k}"} for d in tops[k][:3]]}
                      for k in range(K)}}
    (root / "atoms" / "characterisation.json").write_text(json.dumps(char))
    if with_metrics:
        (root / "eval").mkdir()
        rows = [{"variant": "baseline-0", "behaviour": "yesno", "kind": "baseline", "atoms": [], "group": None, "sign": "none", "alpha": 0.0,
                 "steered_behaviour": None, "all_rate": 0.3, "all_ci_low": 0.2, "all_ci_high": 0.4}]
        for sign, alpha, rate in (("toward", 1.0, 0.5), ("toward", 2.0, 0.7), ("away", 1.0, 0.2)):
            rows.append({"variant": f"atom3-{sign}-a{alpha:g}", "behaviour": "yesno", "kind": "atom", "atoms": [3], "group": None, "sign": sign,
                         "alpha": alpha, "steered_behaviour": "yesno", "all_rate": rate, "all_ci_low": rate - 0.1, "all_ci_high": rate + 0.1})
        rows.append({"variant": "group0-toward-a1", "behaviour": "yesno", "kind": "group", "atoms": [0, 1], "group": 0, "sign": "toward",
                     "alpha": 1.0, "steered_behaviour": "yesno", "all_rate": 0.9, "all_ci_low": 0.8, "all_ci_high": 0.95})
        pq.write_table(pa.Table.from_pylist(rows), root / "eval" / "metrics.parquet")
    return root


def test_steering_curves_by_hand():
    rows = [
        {"kind": "baseline", "behaviour": "b", "all_rate": 0.3, "all_ci_low": 0.2, "all_ci_high": 0.4},
        {"kind": "atom", "atoms": [3], "sign": "away", "alpha": 2.0, "behaviour": "b", "steered_behaviour": "b", "all_rate": 0.1},
        {"kind": "atom", "atoms": [3], "sign": "toward", "alpha": 1.0, "behaviour": "b", "steered_behaviour": "b", "all_rate": 0.6},
        {"kind": "composition", "atoms": [3, 4], "sign": "toward", "alpha": 1.0, "behaviour": "b", "all_rate": 0.9},
        {"kind": "group", "group": 2, "atoms": [3, 4], "sign": "toward", "alpha": 1.0, "behaviour": "b", "all_rate": 0.8},
    ]
    c = steering_curves(rows)
    assert sorted(c) == ["atom:3", "group:2"]
    assert [p[:2] for p in c["atom:3"][0]["points"]] == [[-2.0, 0.1], [0.0, 0.3], [1.0, 0.6]]
    assert [p[:2] for p in c["group:2"][0]["points"]] == [[0.0, 0.3], [1.0, 0.8]]


def test_explorer_data_is_plain_json_and_complete(tmp_path):
    root = _fixture_run(tmp_path, with_metrics=False)
    data = explorer_data(root)
    json.dumps(data, allow_nan=False)
    assert len(data["atoms"]) == 20 and len(data["groups"]) == 4
    assert all(a["group"] is not None and len(a["neighbours"]) == 5 for a in data["atoms"])
    assert data["curves"] == {}


def test_explorer_in_headless_chromium(tmp_path):
    root = _fixture_run(tmp_path, with_metrics=True)
    html = build_explorer(root)
    assert "https://" not in html.read_text().split('id="explorer-data"')[0]  # nothing to fetch before the data
    shot = tmp_path / "explorer.png"

    async def scenario(page: Page):
        out: dict = {}
        await page.wait_for(ROWS)
        out["groups_rows"] = await page.js(ROWS)
        await page.js("document.querySelector('.tabs button[data-view=atoms]').click()")
        await page.wait_for(f"document.getElementById('table').dataset.view === 'atoms' && {ROWS} === 20")
        out["atom_rows"] = await page.js(ROWS)
        # search: Grid.js's own search box (debounced)
        await page.js("(() => { const i = " + VISIBLE + ".querySelector('.gridjs-search-input'); i.value = 'word13'; i.dispatchEvent(new Event('input', {bubbles: true})); })()")
        await page.wait_for(f"{ROWS} === 1")
        out["after_search"] = await page.js("Array.from(" + VISIBLE + ".querySelectorAll('.gridjs-tbody .gridjs-tr')).map(r => r.cells[0].textContent)")
        # select the row: the atom's documents, group and neighbours appear
        await page.js("" + VISIBLE + ".querySelector('.gridjs-tbody .gridjs-tr').click()")
        await page.wait_for("document.getElementById('detail').dataset.selected === 'atom-13'")
        out["docs"] = await page.js("Array.from(document.querySelectorAll('#documents .doc .response')).map(e => e.textContent)")
        out["prompt_text"] = await page.js("document.querySelector('#documents .doc .prompt').textContent")
        out["injected_scripts"] = await page.js("document.querySelectorAll('#detail script').length")
        out["neighbours"] = await page.js("document.querySelectorAll('#neighbours a').length")
        out["no_curve"] = await page.js("document.getElementById('curve').textContent")
        # its group link shows the group's members
        await page.js("document.querySelector('#detail .meta a').click()")
        await page.wait_for("(document.getElementById('detail').dataset.selected || '').startsWith('group-')")
        out["members"] = await page.js("Array.from(document.querySelectorAll('#members a')).map(a => Number(a.textContent.split(' ')[1]))")
        # an evaluated atom has a steering curve
        await page.js("window.explorer.select('atom', 3)")
        out["title3"] = await page.js("document.querySelector('#detail h2').textContent")
        out["curve_points"] = await page.js("document.querySelectorAll('#curve svg circle').length")
        await asyncio.sleep(1.0)  # Grid.js runs its pipeline throttled: a late failure would show up by now
        out["messages"] = await page.js("Array.from(document.querySelectorAll('.gridjs-message')).map(e => e.textContent)")
        return out

    out, errors = drive(html, tmp_path, scenario, screenshot=shot)
    assert errors == [] and out["messages"] == []
    assert out["groups_rows"] == 4 and out["atom_rows"] == 20
    assert out["after_search"] == ["13"]
    assert out["docs"] and all(t.endswith("for atom 13") for t in out["docs"])
    assert "<script>alert(1)</script>" in out["prompt_text"] and out["injected_scripts"] == 0  # text, never markup
    assert out["neighbours"] == 5 and "not evaluated" in out["no_curve"]
    assert 13 in out["members"] and len(out["members"]) >= 2
    assert out["title3"] == "Atom 3 \u2014 Answers yes or no"
    assert out["curve_points"] == 4  # away 1, baseline, toward 1, toward 2
    assert shot.stat().st_size > 10_000
    if os.environ.get("GA_RAY_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["GA_RAY_KEEP_SCREENSHOT"])


def test_browser_check_catches_console_errors(tmp_path):
    """Negative control: the same driver reports an exception thrown by the page."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head><link rel="icon" href="data:,"><title>bad</title></head><body><script>undefinedFunction()</script></body></html>')

    async def scenario(page: Page):
        return await page.js("document.title")

    title, errors = drive(bad, tmp_path, scenario)
    assert title == "bad" and any("undefinedFunction" in e for e in errors)


def test_explorer_without_groups_lists_atoms_only(tmp_path):
    w = constructed_world(seed=7)
    root = make_stage_run(tmp_path / "run", w, with_label=False)  # no groups stage run
    data = explorer_data(root)
    assert data["groups"] == [] and len(data["atoms"]) == w["K"]
    assert all(a["group"] is None and a["neighbours"] == [] for a in data["atoms"])
    assert "no groups: run `ga-ray groups`" in build_explorer(root).read_text()
