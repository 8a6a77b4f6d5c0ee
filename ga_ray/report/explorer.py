"""The atom explorer: `report/explorer.html`, one self-contained page (works offline, from file://).

A searchable, sortable table of the atoms and of the groups (Grid.js, vendored under `assets/`, MIT),
and for the selected row: its numbers, characteristic words, label (if the coherence stage asked for
one), its top documents with prompt and response, its group and nearest atoms (atoms) or member atoms
(groups), and, once the run was evaluated (`eval/metrics.parquet`), its steering curve: the detector
rate of each prompt set against the signed step (toward > 0, away < 0, the alpha = 0 baseline at 0).

Everything the page shows is embedded as one JSON document; the page builds its DOM with `textContent`
only, so a document's text can never become markup. Reads each stage's files through that stage's
readers where they exist; every input but the coherence atom table is optional.
"""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path
from typing import Any

from ga_ray.rundir import atomic_write_text

ASSETS = ("gridjs.umd.js", "gridjs-mermaid.min.css")


def _asset(name: str) -> str:
    return resources.files("ga_ray.report").joinpath("assets", name).read_text(encoding="utf-8")


def _num(x: Any, nd: int = 4) -> float | None:
    if x is None or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return round(float(x), nd)


def _read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except ValueError:
        return None


def _atom_characterisation(run_root: Path) -> dict[str, Any]:
    try:
        from ga_ray.coherence import io as cio

        char = cio.load_characterisation(run_root, missing_ok=True)
        if char is not None:
            return char.get("atoms", {})
    except ImportError:
        pass
    return (_read_json(run_root / "atoms" / "characterisation.json") or {}).get("atoms", {})


def _examples(entry: dict[str, Any] | None) -> list[dict[str, Any]]:
    return [{"doc_id": int(e.get("doc_id", -1)), "prompt": str(e.get("prompt", "")), "response": str(e.get("response", ""))} for e in (entry or {}).get("examples", [])]


def steering_curves(metrics: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """`atom:K` / `group:G` -> per evaluated prompt set, points (signed alpha, rate, ci low, ci high).

    Toward is plotted at +alpha, away at −alpha; the alpha = 0 baseline (kind `baseline`) joins every curve.
    Only single-atom and group variants get a curve (compositions, random and supervised ones do not).
    """
    base: dict[str, list[float | None]] = {}
    for r in metrics:
        if r.get("kind") == "baseline":
            base[str(r.get("behaviour"))] = [0.0, _num(r.get("all_rate")), _num(r.get("all_ci_low")), _num(r.get("all_ci_high"))]
    curves: dict[str, dict[str, dict[str, Any]]] = {}
    for r in metrics:
        kind = r.get("kind")
        atoms = list(r.get("atoms") or [])
        if kind == "atom" and len(atoms) == 1:
            key = f"atom:{int(atoms[0])}"
        elif kind == "group" and r.get("group") is not None:
            key = f"group:{int(r['group'])}"
        else:
            continue
        alpha = float(r.get("alpha") or 0.0)
        x = -alpha if r.get("sign") == "away" else alpha
        beh = str(r.get("behaviour"))
        c = curves.setdefault(key, {}).setdefault(beh, {"behaviour": beh, "steered": r.get("steered_behaviour"), "points": []})
        c["points"].append([x, _num(r.get("all_rate")), _num(r.get("all_ci_low")), _num(r.get("all_ci_high"))])
    out: dict[str, list[dict[str, Any]]] = {}
    for key, per in curves.items():
        lines = []
        for beh, c in sorted(per.items()):
            pts = c["points"] + ([base[beh]] if beh in base else [])
            c["points"] = sorted(pts, key=lambda p: p[0])
            lines.append(c)
        out[key] = lines
    return out


def _metrics_rows(run_root: Path) -> list[dict[str, Any]]:
    path = run_root / "eval" / "metrics.parquet"
    if not path.exists():
        return []
    import pyarrow.parquet as pq

    try:
        return pq.read_table(str(path)).to_pylist()
    except Exception:  # an unreadable metrics file: the explorer shows no curves rather than failing
        return []


def explorer_data(run_root: Path) -> dict[str, Any]:
    """Everything the page shows, as one JSON-serialisable dict."""
    from ga_ray.groups import io as gio
    from ga_ray.groups.stage import load_atom_table

    run_root = Path(run_root)
    atoms_tab = load_atom_table(run_root).to_pylist()
    char = _atom_characterisation(run_root)
    group_of: dict[int, int] = {}
    groups: list[dict[str, Any]] = []
    neighbours: list[Any] = []
    if gio.exists(run_root):
        gchar = (_read_json(gio.groups_dir(run_root) / "characterisation.json") or {}).get("groups", {})
        for g in gio.load_groups(run_root).to_pylist():
            gid = int(g["group"])
            for a in g["atoms"]:
                group_of[int(a)] = gid
            groups.append(
                {
                    "id": gid,
                    "atoms": [int(a) for a in g["atoms"]],
                    "n_atoms": int(g["n_atoms"]),
                    "n_docs": int(g["n_documents"]),
                    "coherence": _num(g["coherence"]),
                    "words": list(g["words"] or []),
                    "examples": _examples(gchar.get(str(gid))),
                }
            )
        neighbours = gio.load_tree(run_root).get("neighbours") or []
    atoms = []
    for r in atoms_tab:
        k = int(r["atom"])
        c = char.get(str(k), {})
        atoms.append(
            {
                "id": k,
                "coherence": _num(r.get("coherence")),
                "n_docs": int(r.get("n_positive_docs", r.get("n_active_docs", 0)) or 0),
                "words": list(c.get("keywords", [])),
                "label": c.get("label") or "",
                "group": group_of.get(k),
                "neighbours": neighbours[k] if k < len(neighbours) else [],
                "examples": _examples(c),
            }
        )
    return {"run": run_root.name, "atoms": atoms, "groups": groups, "curves": steering_curves(_metrics_rows(run_root))}


def _script_json(obj: Any) -> str:
    """JSON safe inside <script type="application/json"> (no `</`, no HTML comment openers)."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


PAGE_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1b1f24;background:#f6f7f9}
header{padding:12px 20px;background:#20324a;color:#fff}header h1{font-size:18px;margin:0}header p{margin:4px 0 0;font-size:13px;opacity:.85}
main{display:flex;gap:16px;padding:16px 20px;align-items:flex-start}
.gridjs-th-content{white-space:normal!important;overflow:visible!important;text-overflow:clip!important}.gridjs-th-sort .gridjs-th-content{width:auto!important;padding-right:18px}#left{flex:1 1 55%;min-width:0}#detail{flex:1 1 45%;min-width:0;background:#fff;border:1px solid #d9dde3;border-radius:8px;padding:14px 16px}
.tabs button{border:1px solid #c4cad3;background:#fff;padding:6px 14px;border-radius:6px;margin-right:6px;cursor:pointer;font-size:14px}
.tabs button.on{background:#20324a;color:#fff;border-color:#20324a}
.gridjs-tr{cursor:pointer}.gridjs-td{font-size:13px;padding:5px 10px;line-height:1.3}.gridjs-th{font-size:13px;padding:8px 10px}
#detail h2{font-size:17px;margin:0 0 6px}.meta{font-size:13px;color:#4a5462;margin-bottom:8px}
.chip{display:inline-block;background:#e8eef6;border-radius:10px;padding:1px 8px;margin:2px;font-size:12px}
a.link{color:#1f5fbf;cursor:pointer;text-decoration:underline}
.doc{border-top:1px solid #e3e6ea;padding:8px 0;font-size:13px}.doc .id{color:#6b7480;font-size:11px}
.doc .prompt{white-space:pre-wrap;color:#333}.doc .response{white-space:pre-wrap;background:#f3f6f9;border-left:3px solid #4c7bd9;padding:4px 8px;margin-top:4px}
h3{font-size:14px;margin:14px 0 4px}svg text{font-size:11px;fill:#444}.empty{color:#6b7480;font-size:13px}
"""

PAGE_JS = r"""
(function () {
  const DATA = JSON.parse(document.getElementById('explorer-data').textContent);
  const byAtom = new Map(DATA.atoms.map(a => [a.id, a]));
  const byGroup = new Map(DATA.groups.map(g => [g.id, g]));
  const detail = document.getElementById('detail');
  let view = DATA.groups.length ? 'groups' : 'atoms';
  const num = v => (v === null || v === undefined ? -1 : v);
  const fmtc = c => (c === null || c === undefined || c < -0.5 ? '\u2013' : Number(c).toFixed(3));
  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function columns() {
    return view === 'atoms'
      ? [{name: 'atom', width: '80px'}, {name: 'group', width: '85px', formatter: g => (g < 0 ? '\u2013' : g)},
         {name: 'coherence', width: '115px', formatter: fmtc}, {name: 'documents', width: '115px'}, {name: 'words', sort: false}, {name: 'label'}]
      : [{name: 'group', width: '85px'}, {name: 'atoms', width: '80px'}, {name: 'coherence', width: '115px', formatter: fmtc},
         {name: 'documents', width: '115px'}, {name: 'words', sort: false}, {name: 'members', sort: false}];
  }
  function rows() {
    return view === 'atoms'
      ? DATA.atoms.map(a => [a.id, a.group === null || a.group === undefined ? -1 : a.group, num(a.coherence), a.n_docs, a.words.join(' '), a.label])
      : DATA.groups.map(g => [g.id, g.n_atoms, num(g.coherence), g.n_docs, g.words.join(' '), g.atoms.slice(0, 12).join(' ') + (g.atoms.length > 12 ? ' \u2026' : '')]);
  }
  // one Grid.js instance at a time: a view switch destroys the table and builds a fresh one (two live
  // instances, or one reconfigured in place, race in Grid.js's throttled pipeline)
  let grid = null;
  function setView(v) {
    view = v;
    for (const b of document.querySelectorAll('.tabs button')) b.classList.toggle('on', b.dataset.view === v);
    const box = document.getElementById('table');
    if (grid) grid.destroy();
    box.replaceChildren();
    grid = new gridjs.Grid({columns: columns(), data: rows(), search: true, sort: true, pagination: {limit: 20}});
    grid.on('rowClick', (ev, row) => select(v === 'atoms' ? 'atom' : 'group', row.cells[0].data));
    grid.render(box);
    box.dataset.view = v;
  }
  for (const b of document.querySelectorAll('.tabs button')) b.addEventListener('click', () => setView(b.dataset.view));
  if (!DATA.groups.length) document.querySelector('[data-view=groups]').disabled = true;

  function link(kind, id, text) {
    const a = el('a', {class: 'link', href: '#' + kind + '-' + id}, text);
    a.addEventListener('click', ev => { ev.preventDefault(); select(kind, id); });
    return a;
  }
  function chips(words) {
    const d = el('div');
    if (!words.length) d.appendChild(el('span', {class: 'empty'}, 'no characteristic words'));
    for (const w of words) d.appendChild(el('span', {class: 'chip'}, w));
    return d;
  }
  function docs(examples) {
    const d = el('div', {id: 'documents'});
    if (!examples.length) d.appendChild(el('p', {class: 'empty'}, 'no documents recorded'));
    for (const ex of examples) {
      const box = el('div', {class: 'doc'});
      box.appendChild(el('div', {class: 'id'}, 'document ' + ex.doc_id));
      box.appendChild(el('div', {class: 'prompt'}, ex.prompt));
      box.appendChild(el('div', {class: 'response'}, ex.response));
      d.appendChild(box);
    }
    return d;
  }
  const NS = 'http://www.w3.org/2000/svg';
  function svg(tag, attrs) { const e = document.createElementNS(NS, tag); for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v); return e; }
  const COLORS = ['#1f5fbf', '#d9534f', '#2e8b57', '#e69f00', '#8e44ad', '#555'];
  function curve(lines) {
    const box = el('div', {id: 'curve'});
    if (!lines || !lines.length) { box.appendChild(el('p', {class: 'empty'}, 'not evaluated yet (no eval/metrics.parquet rows for it)')); return box; }
    const W = 420, H = 220, L = 40, R = 110, T = 10, B = 30;
    const xs = lines.flatMap(l => l.points.map(p => p[0]));
    const x0 = Math.min(...xs, 0), x1 = Math.max(...xs, 0), span = (x1 - x0) || 1;
    const X = x => L + (x - x0) / span * (W - L - R), Y = y => T + (1 - y) * (H - T - B);
    const s = svg('svg', {width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: 'img'});
    s.appendChild(svg('line', {x1: L, y1: Y(0), x2: W - R, y2: Y(0), stroke: '#999'}));
    s.appendChild(svg('line', {x1: L, y1: Y(1), x2: L, y2: Y(0), stroke: '#999'}));
    s.appendChild(svg('line', {x1: X(0), y1: Y(1), x2: X(0), y2: Y(0), stroke: '#ccc', 'stroke-dasharray': '3,3'}));
    for (const [v, t] of [[0, '0'], [0.5, '0.5'], [1, '1']]) { const tx = svg('text', {x: 4, y: Y(v) + 4}); tx.textContent = t; s.appendChild(tx); }
    const xl = svg('text', {x: L + 40, y: H - 4}); xl.textContent = '\u2190 away   signed \u03b1   toward \u2192'; s.appendChild(xl);
    for (const v of [...new Set(xs)].sort((a, b) => a - b)) { const t = svg('text', {x: X(v) - 6, y: Y(0) + 13}); t.textContent = v; s.appendChild(t); }
    lines.forEach((l, i) => {
      const c = COLORS[i % COLORS.length];
      const pts = l.points.filter(p => p[1] !== null);
      s.appendChild(svg('polyline', {points: pts.map(p => X(p[0]) + ',' + Y(p[1])).join(' '), fill: 'none', stroke: c, 'stroke-width': l.behaviour === l.steered ? 2.5 : 1.2}));
      for (const p of pts) s.appendChild(svg('circle', {cx: X(p[0]), cy: Y(p[1]), r: 2.5, fill: c}));
      const lab = svg('text', {x: W - R + 6, y: T + 14 + 14 * i, fill: c}); lab.textContent = l.behaviour; s.appendChild(lab);
    });
    box.appendChild(s);
    return box;
  }
  function select(kind, id) {
    id = Number(id);
    detail.replaceChildren();
    if (kind === 'atom' && byAtom.has(id)) {
      const a = byAtom.get(id);
      detail.appendChild(el('h2', {}, 'Atom ' + a.id + (a.label ? ' \u2014 ' + a.label : '')));
      const m = el('div', {class: 'meta'});
      m.appendChild(document.createTextNode('coherence ' + fmtc(a.coherence) + ' \u00b7 ' + a.n_docs + ' documents \u00b7 '));
      if (a.group !== null && a.group !== undefined) m.appendChild(link('group', a.group, 'group ' + a.group)); else m.appendChild(document.createTextNode('no group'));
      detail.appendChild(m);
      detail.appendChild(chips(a.words));
      detail.appendChild(el('h3', {}, 'Nearest atoms'));
      const nb = el('div', {id: 'neighbours'});
      if (!a.neighbours.length) nb.appendChild(el('span', {class: 'empty'}, 'none recorded (run the groups stage)'));
      for (const [j, sim] of a.neighbours) { nb.appendChild(link('atom', j, 'atom ' + j)); nb.appendChild(document.createTextNode(' (' + Number(sim).toFixed(2) + ')  ')); }
      detail.appendChild(nb);
      detail.appendChild(el('h3', {}, 'Steering curve'));
      detail.appendChild(curve(DATA.curves['atom:' + a.id]));
      detail.appendChild(el('h3', {}, 'Top documents'));
      detail.appendChild(docs(a.examples));
    } else if (kind === 'group' && byGroup.has(id)) {
      const g = byGroup.get(id);
      detail.appendChild(el('h2', {}, 'Group ' + g.id + (g.words.length ? ' \u2014 ' + g.words.slice(0, 3).join(', ') : '')));
      detail.appendChild(el('div', {class: 'meta'}, 'coherence ' + fmtc(g.coherence) + ' \u00b7 ' + g.n_atoms + ' atoms \u00b7 ' + g.n_docs + ' documents'));
      detail.appendChild(chips(g.words));
      detail.appendChild(el('h3', {}, 'Member atoms'));
      const mem = el('div', {id: 'members'});
      for (const a of g.atoms) { mem.appendChild(link('atom', a, 'atom ' + a)); mem.appendChild(document.createTextNode(' ')); }
      detail.appendChild(mem);
      detail.appendChild(el('h3', {}, 'Steering curve'));
      detail.appendChild(curve(DATA.curves['group:' + g.id]));
      detail.appendChild(el('h3', {}, 'Top documents'));
      detail.appendChild(docs(g.examples));
    } else {
      detail.appendChild(el('p', {class: 'empty'}, 'Select a row to see its documents.'));
      return;
    }
    detail.dataset.selected = kind + '-' + id;
    if (location.hash !== '#' + kind + '-' + id) history.replaceState(null, '', '#' + kind + '-' + id);
  }
  const m = /^#(atom|group)-(\d+)$/.exec(location.hash);
  if (m) select(m[1], m[2]); else select('none', -1);
  setView(view);
  window.explorer = {select, setView};
})();
"""


def render_explorer(data: dict[str, Any]) -> str:
    n_a, n_g = len(data["atoms"]), len(data["groups"])
    title = f"Atom explorer: {data['run']}"
    sub = f"{n_a} atoms" + (f" in {n_g} groups" if n_g else " (no groups: run `ga-ray groups`)") + (" \u00b7 steering curves from eval/" if data["curves"] else "")
    from html import escape

    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">'
        f"<title>{escape(title)}</title>"
        f"<style>{_asset('gridjs-mermaid.min.css')}</style><style>{PAGE_CSS}</style></head><body>"
        f"<header><h1>{escape(title)}</h1><p>{escape(sub)}. Search and sort the table; click a row.</p></header>"
        '<main><div id="left"><div class="tabs"><button data-view="groups">Groups</button><button data-view="atoms">Atoms</button></div>'
        '<div id="table"></div></div><section id="detail"></section></main>'
        f'<script type="application/json" id="explorer-data">{_script_json(data)}</script>'
        f"<script>{_asset('gridjs.umd.js')}</script><script>{PAGE_JS}</script></body></html>\n"
    )


def build_explorer(run_root: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write `report/explorer.html` (atomically) and return its path."""
    run_root = Path(run_root)
    out = Path(out_dir) if out_dir is not None else run_root / "report"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "explorer.html"
    atomic_write_text(path, render_explorer(explorer_data(run_root)))
    return path
