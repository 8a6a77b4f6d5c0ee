"""Stage `steer`: PEFT adapter folders moved along oriented atoms, groups, compositions and controls.

Reads the fine-tuned adapter, `factors/` (unprojection), the coherence stage's oriented dictionary
and atom table, `data/` (token ids and loss masks only: responses for the detectors; the label column
is never read), `groups/` (only with `steer.groups`) and `gradients/` (only for the supervised
controls). Writes `variants/<name>/` folders (`ga_ray.steer.io`), `variants/index.parquet` and
`variants/choices.json` (the behaviour-chosen atoms with their detector rates).

Per chosen target (an atom, a group = the sum of its members' vectors, a composition = a weighted
sum of atoms) and every α of `steer.alphas`, both signs, one variant per mode; plus the baseline
(α = 0: the fine-tuned adapter itself) and, with `steer.controls`, per behaviour-chosen atom a random
direction of the atom's norm and the behaviour's supervised direction (`directions.py`), at
`steer.control_alphas`. No Ray: a few hundred small tensor operations and file writes.

`add_variant(run_dir, cfg, ...)` writes one more variant later (the evaluate stage calls it at the
α it recommends); a running server lists the new folder without a restart.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as pads
import torch

from ga_ray.config import RunConfig
from ga_ray.errors import ConfigError, DataError, StageError
from ga_ray.rundir import atomic_write_json, fingerprint_path
from ga_ray.steer import adapters as lora
from ga_ray.steer import directions as dirs
from ga_ray.steer import io as vio
from ga_ray.steer.choose import Choice, choose_by_behaviour, detector_flags, response_token_ids

log = logging.getLogger("ga_ray")

CHOICES_FILE = "choices.json"
SIGNS = ("toward", "away")


# ------------------------------------------------------------------------ coherence artifacts (I/O)


def load_oriented_atoms(run_dir: Path) -> tuple[np.ndarray, dict[str, list]]:
    """(oriented dictionary K×D, atom table as columns: atom, coherence, n_active_docs, top_doc_ids).

    Through `ga_ray.coherence.io` when the run has the coherence stage's own folder; runs made before
    it moved there keep these files in `atoms/`."""
    try:
        from ga_ray.coherence import io as cio
    except ImportError:  # pragma: no cover - the module lands with the artifacts move
        cio = None
    if cio is not None and cio.exists(run_dir):
        D, _ = cio.load_oriented_dictionary(run_dir)
        t = cio.load_atom_table(run_dir)
    else:
        import pyarrow.parquet as pq
        from safetensors.numpy import load_file

        atoms_dir = Path(run_dir) / "atoms"
        f_dict, f_table = atoms_dir / "dictionary_oriented.safetensors", atoms_dir / "atoms.parquet"
        for f in (f_dict, f_table):
            if not f.exists():
                raise StageError(f"{f} is missing: run the coherence stage first (`ga-ray coherence --run-dir {run_dir}`)")
        D = load_file(str(f_dict))["dictionary"]
        t = pq.read_table(str(f_table), columns=["atom", "coherence", "n_active_docs", "top_doc_ids"])
    cols = {c: t.column(c).to_pylist() for c in ("atom", "coherence", "n_active_docs", "top_doc_ids")}
    cols["coherence"] = [float("nan") if c is None else float(c) for c in cols["coherence"]]
    return np.asarray(D, dtype=np.float32), cols


def read_responses(data_dir: Path, tokenizer) -> dict[int, str]:
    """{doc_id: decoded response} of every document of data/ (reads doc_id, input_ids, loss_mask only)."""
    files = sorted(str(p) for p in Path(data_dir).glob("*.parquet") if not p.name.startswith((".", "_")))
    if not files:
        raise StageError(f"no Parquet documents in {data_dir}: run the prepare stage first (`ga-ray prepare`)")
    t = pads.dataset(files, format="parquet").to_table(columns=["doc_id", "input_ids", "loss_mask"])
    ids = [int(d) for d in t.column("doc_id").to_pylist()]
    toks = [response_token_ids(i, m) for i, m in zip(t.column("input_ids").to_pylist(), t.column("loss_mask").to_pylist())]
    texts = tokenizer.batch_decode(toks, skip_special_tokens=True)
    return dict(zip(ids, texts))


# ------------------------------------------------------------------------------------- the steerer


@dataclass(frozen=True)
class Target:
    """What a variant is steered along (before α, sign and mode)."""

    kind: str  # atom | group | composition | random | supervised
    atoms: tuple[int, ...] = ()
    weights: tuple[float, ...] = ()
    group: int | None = None
    behaviour: str | None = None


class Steerer:
    """Builds steered variants of one run's fine-tuned adapter; every input is loaded on first use."""

    def __init__(self, run_dir: str | Path, cfg: RunConfig, adapter_path: str | Path, out: str | Path | None = None):
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.sc = cfg.steer
        self.adapter_path = Path(adapter_path)
        self.out = Path(out) if out is not None else self.run_dir / vio.VARIANTS_DIR
        self.tensors, self.adapter_config = vio.load_adapter_tensors(self.adapter_path)
        self.theta_norm = lora.theta_norm(self.tensors)
        self._projector = None
        self._dictionary: np.ndarray | None = None
        self._table: dict[str, list] | None = None
        self._responses: dict[int, str] | None = None
        self._flags: dict[str, dict[int, bool]] | None = None
        self._vectors: dict[Any, dict] = {}
        self._merge_base = None
        self._tokenizer = None
        self.source = self._source_fingerprint()

    # ----------------------------------------------------------------------------- inputs
    def _source_fingerprint(self) -> str:
        """What every variant of this run depends on: the adapter, the factors, the oriented atoms."""
        parts = [vio.content_hash(self.tensors, self.adapter_config), fingerprint_path(self.run_dir / "factors")]
        for p in (self.run_dir / "coherence" / "dictionary_oriented.safetensors", self.run_dir / "atoms" / "dictionary_oriented.safetensors"):
            if p.exists():
                parts.append(fingerprint_path(p))
                break
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    @property
    def projector(self):
        if self._projector is None:
            from ga_ray.factors.projection import Projector

            fdir = self.run_dir / "factors"
            if not fdir.exists():
                raise StageError(f"{fdir} is missing: run the factors stage first (`ga-ray factors --run-dir {self.run_dir}`)")
            self._projector = Projector(fdir)
            # every factors block must land on an adapter tensor of its shape, before any work is done
            lora.match_direction({fb.name: torch.empty(fb.shape) for fb in self._projector.factors.blocks}, self.tensors)
        return self._projector

    def _atoms(self) -> tuple[np.ndarray, dict[str, list]]:
        if self._dictionary is None:
            self._dictionary, self._table = load_oriented_atoms(self.run_dir)
        return self._dictionary, self._table

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from ga_ray.kernel.loading import load_tokenizer

            self._tokenizer = load_tokenizer(self.cfg.model)
        return self._tokenizer

    def detectors(self):
        from ga_ray.detectors import detector_registry

        try:
            return detector_registry(self.cfg.detectors)
        except ValueError as exc:
            raise ConfigError(f"detectors: {exc}") from None

    def flags(self) -> dict[str, dict[int, bool]]:
        """{behaviour: {doc_id: the detector fires on the document's response}} over all of data/."""
        if self._flags is None:
            if self._responses is None:
                self._responses = read_responses(self.run_dir / "data", self.tokenizer)
            self._flags = detector_flags(self._responses, self.detectors())
        return self._flags

    # ----------------------------------------------------------------------------- choosing
    def atom_info(self, atom: int) -> dict[str, Any]:
        _, t = self._atoms()
        try:
            i = t["atom"].index(int(atom))
        except ValueError:
            raise ConfigError(f"steer: atom {atom} is not in the atom table (atoms 0..{len(t['atom']) - 1})") from None
        return {"atom": int(atom), "coherence": t["coherence"][i], "n_active_docs": int(t["n_active_docs"][i]), "top_doc_ids": t["top_doc_ids"][i]}

    def choose(self) -> dict[str, Choice | None]:
        _, t = self._atoms()
        return choose_by_behaviour(t["atom"], t["top_doc_ids"], t["coherence"], t["n_active_docs"], self.flags(), self.sc.top_docs, self.sc.min_docs)

    def top_coherent(self, n: int) -> list[int]:
        _, t = self._atoms()
        coh = np.asarray(t["coherence"], dtype=np.float64)
        order = sorted(range(len(coh)), key=lambda i: (-(coh[i] if np.isfinite(coh[i]) else -np.inf), t["atom"][i]))
        return [int(t["atom"][i]) for i in order[:n]]

    # ----------------------------------------------------------------------------- vectors (file keys)
    def atom_vector(self, atom: int) -> dict:
        key = ("atom", int(atom))
        if key not in self._vectors:
            D, _ = self._atoms()
            if not 0 <= int(atom) < D.shape[0]:
                raise ConfigError(f"steer: atom {atom} is out of range: the dictionary has {D.shape[0]} atoms (0..{D.shape[0] - 1})")
            v = dirs.atom_direction(self.projector, D[int(atom)])
            self._vectors[key] = lora.match_direction(v, self.tensors)
        return self._vectors[key]

    def vector(self, target: Target) -> dict:
        if target.kind == "atom":
            return self.atom_vector(target.atoms[0])
        if target.kind in ("composition", "group"):
            return dirs.combine([self.atom_vector(a) for a in target.atoms], list(target.weights))
        if target.kind == "random":
            key = ("random", target.atoms, target.group)
            if key not in self._vectors:
                like = self.vector(Target("group" if target.group is not None else "atom", target.atoms, tuple(1.0 for _ in target.atoms), target.group))
                self._vectors[key] = dirs.random_direction(like, dirs.direction_norm(like), dirs.control_seed(self.sc.seed, "random", *target.atoms))
            return self._vectors[key]
        if target.kind == "supervised":
            key = ("supervised", target.behaviour, target.atoms)
            if key not in self._vectors:
                self._vectors[key] = self.supervised_vector(target.behaviour, dirs.direction_norm(self.atom_vector(target.atoms[0])))
            return self._vectors[key]
        raise ValueError(f"unknown target kind {target.kind!r}")

    def supervised_vector(self, behaviour: str, norm: float) -> dict:
        from ga_ray.gradients.io import read_z

        flags = self.flags()
        if behaviour not in flags:
            raise ConfigError(f"steer: no detector {behaviour!r} (detectors: {', '.join(flags)})")
        gdir = self.run_dir / "gradients"
        if not gdir.exists():
            raise StageError(f"{gdir} is missing: the supervised control needs the gradients stage (`ga-ray gradients`), or set steer.controls=false")
        doc_ids, Z = read_z(gdir)
        fired = np.asarray([flags[behaviour].get(int(d), False) for d in doc_ids])
        if not fired.any():
            raise DataError(f"no training document's response fires the {behaviour!r} detector: no supervised direction for it")
        v = dirs.supervised_direction(self.projector, Z[fired], norm)
        return lora.match_direction(v, self.tensors)

    def group_target(self, group: int) -> Target:
        from ga_ray.groups.io import group_members

        members = group_members(self.run_dir)
        if int(group) not in members:
            raise ConfigError(f"steer.groups: group {group} is not in groups/groups.parquet (groups: {', '.join(map(str, sorted(members)))})")
        atoms = tuple(members[int(group)])
        return Target("group", atoms, tuple(1.0 for _ in atoms), int(group))

    # ----------------------------------------------------------------------------- writing
    def modes(self, mode: str | None = None) -> list[str]:
        m = mode or self.sc.mode
        return ["paper", "linear"] if m == "both" else [m]

    def _merge_fn(self):
        if not self.sc.merge:
            return None
        from peft import PeftModel

        from ga_ray.kernel.loading import load_base_model

        if self._merge_base is None:
            self._merge_base = load_base_model(self.cfg.model, dtype="float32")
        tokenizer = self.tokenizer

        def merge(folder: Path) -> None:
            model = PeftModel.from_pretrained(copy.deepcopy(self._merge_base), str(folder.parent), is_trainable=False)
            merged = model.merge_and_unload()
            merged.save_pretrained(str(folder), safe_serialization=True)
            tokenizer.save_pretrained(str(folder))

        return merge

    def baseline(self) -> dict[str, Any]:
        tensors, config = dict(self.tensors), dict(self.adapter_config)
        if self.sc.vllm_rank:
            tensors, config = lora.pad_rank(tensors, config, lora.vllm_rank(lora.lora_rank(config)))
        meta = {"kind": "baseline", "atoms": [], "weights": [], "sign": "none", "alpha": 0.0, "units": self.sc.units, "mode": "paper",
                "v_norm": None, "delta_norm": 0.0, "rel_delta": 0.0, "rank": lora.lora_rank(config), "source": self.source}
        return vio.write_variant(self.out, vio.variant_stem("baseline"), tensors, config, meta, merge_fn=self._merge_fn())

    def write(self, target: Target, sign: str, alpha: float, mode: str, units: str | None = None) -> dict[str, Any]:
        units = units or self.sc.units
        v = self.vector(target)
        st = lora.steer(self.tensors, self.adapter_config, v, sign, alpha, units=units, mode=mode, vllm_ranks=self.sc.vllm_rank)
        stem = vio.variant_stem(target.kind, sign, alpha, atoms=target.atoms, weights=target.weights, group=target.group,
                                behaviour=target.behaviour, units=units, mode=mode)
        meta = {"kind": target.kind, "atoms": list(target.atoms), "weights": list(target.weights), "group": target.group,
                "behaviour": target.behaviour, "sign": sign, "alpha": float(alpha), "units": units, "mode": mode,
                "v_norm": st.v_norm, "delta_norm": st.delta_norm, "rel_delta": st.rel_delta, "rank": st.rank,
                "coef": st.coef, "source": self.source}
        return vio.write_variant(self.out, stem, st.tensors, st.config, meta, merge_fn=self._merge_fn())

    def write_curve(self, target: Target, alphas: Sequence[float], mode: str | None = None) -> list[dict[str, Any]]:
        return [self.write(target, sign, a, m) for m in self.modes(mode) for a in alphas for sign in SIGNS]

    def write_index(self) -> int:
        """`variants/index.parquet` over this run's variants (folders from other inputs stay on disk, unindexed)."""
        rows = [r for r in vio.list_variants(self.out) if r.get("source") == self.source]
        vio.write_index(self.out, rows)
        return len(rows)


# ------------------------------------------------------------------------------------------ stage


def _targets(s: Steerer, choices: dict[str, Choice | None]) -> list[Target]:
    sc = s.sc
    out: list[Target] = []
    for name, c in choices.items():
        if c is not None:
            out.append(Target("atom", (c.atom,), (1.0,), None, name))
    for a in sc.atoms:
        s.atom_info(a)
        out.append(Target("atom", (int(a),), (1.0,)))
    for a in s.top_coherent(sc.top_coherent) if sc.top_coherent else []:
        out.append(Target("atom", (a,), (1.0,)))
    for g in sc.groups:
        out.append(s.group_target(g))
    for comp in sc.compositions:
        w = comp.weights if comp.weights is not None else [1.0] * len(comp.atoms)
        if len(w) != len(comp.atoms):
            raise ConfigError(f"steer.compositions: {len(comp.atoms)} atom(s) but {len(w)} weight(s) in {comp.atoms}")
        for a in comp.atoms:
            s.atom_info(a)
        out.append(Target("composition", tuple(int(a) for a in comp.atoms), tuple(float(x) for x in w)))
    # one curve per distinct direction: an atom both chosen by behaviour and named by id is written once
    seen, unique = set(), []
    for t in out:
        key = (t.kind, t.atoms, t.weights, t.group)
        if key not in seen:
            seen.add(key)
            unique.append(t)
    return unique


def run_steer(ctx) -> dict[str, Any]:
    t0 = time.perf_counter()
    cfg: RunConfig = ctx.cfg
    sc = cfg.steer
    s = Steerer(ctx.run_dir.root, cfg, ctx.adapter_path(), out=ctx.out)
    choices: dict[str, Choice | None] = {}
    if sc.by_behaviour:
        choices = s.choose()
        for name, c in choices.items():
            if c is None:
                log.warning("steer: %-10s no atom's top documents fire this detector; nothing steered for it", name)
            else:
                log.info("steer: %s", c.line())
    atomic_write_json(ctx.out / CHOICES_FILE, {"top_docs": sc.top_docs, "min_docs": sc.min_docs,
                                               "choices": {k: (c.as_dict() if c else None) for k, c in choices.items()}})
    targets = _targets(s, choices)
    rows = [s.baseline()]
    for t in targets:
        rows += s.write_curve(t, sc.alphas)
    n_controls = 0
    if sc.controls:
        calphas = sc.alphas if sc.control_alphas is None else sc.control_alphas
        for name, c in choices.items():
            if c is None:
                continue
            ctrl = [s.write_curve(Target("random", (c.atom,), (1.0,), None, name), calphas)]
            try:
                ctrl.append(s.write_curve(Target("supervised", (c.atom,), (1.0,), None, name), calphas))
            except DataError as exc:
                log.warning("steer: supervised control for %s skipped: %s", name, exc)
            for group in ctrl:
                rows += group
                n_controls += len(group)
    # an atom chosen for two behaviours shares its curve and random control: count each folder once
    rows = list({r["name"]: r for r in rows}.values())
    n_controls = sum(1 for r in rows if r["kind"] in ("random", "supervised"))
    n_index = s.write_index()
    n_all = len(vio.list_variants(ctx.out))
    if n_all > n_index:
        log.info("steer: %d variant folder(s) from other inputs are kept unindexed (a server may use them); delete them by hand", n_all - n_index)
    wall = time.perf_counter() - t0
    chosen = {k: c.atom for k, c in choices.items() if c is not None}
    line = (f"{len(rows)} variants ({len(targets)} direction(s) x {len(sc.alphas)} alphas x 2 signs x {len(s.modes())} mode(s) + baseline"
            + (f" + {n_controls} controls" if n_controls else "") + f") in {wall:.1f}s"
            + (f"; by behaviour: {', '.join(f'{k}->atom {a}' for k, a in chosen.items())}" if chosen else ""))
    return {
        "line": line,
        "n_variants": len(rows),
        "n_controls": n_controls,
        "n_indexed": n_index,
        "choices": {k: (c.as_dict() if c else None) for k, c in choices.items()},
        "mode": sc.mode,
        "units": sc.units,
        "wall_time_s": round(wall, 2),
    }


# -------------------------------------------------------------------------------- later additions


_STEERER_CACHE: dict[str, Steerer] = {}


def _cached_steerer(run_dir: Path, cfg: RunConfig, adapter_path: Path) -> Steerer:
    """One Steerer kept between `add_variant` calls (the evaluate stage adds a few dozen controls in a
    row: decoding every response and reading gradients/ once, not per call). It is reused only while
    the config sections it reads and the files it steers from are unchanged."""
    inputs = [fingerprint_path(p) if p.exists() else None for p in (adapter_path, run_dir / "data", run_dir / "gradients", run_dir / "groups")]
    key = json.dumps([str(run_dir.resolve()), str(adapter_path.resolve()), inputs,
                      cfg.model.model_dump(mode="json"), cfg.steer.model_dump(mode="json"),
                      [d.model_dump(mode="json") for d in cfg.detectors]], sort_keys=True)
    s = _STEERER_CACHE.get(key)
    if s is None or s._source_fingerprint() != s.source:
        _STEERER_CACHE.clear()
        s = _STEERER_CACHE[key] = Steerer(run_dir, cfg, adapter_path)
    return s


def add_variant(
    run_dir: str | Path,
    cfg: RunConfig,
    kind: str,
    sign: str,
    alpha: float,
    *,
    atom: int | None = None,
    atoms: Sequence[int] | None = None,
    weights: Sequence[float] | None = None,
    group: int | None = None,
    behaviour: str | None = None,
    mode: str | None = None,
    units: str | None = None,
    adapter_path: str | Path | None = None,
) -> dict[str, Any]:
    """Write one more variant into `RUN_DIR/variants/` (e.g. the evaluate stage's recommended α) and
    refresh the index; returns its row (`name`, `dir`, ... as in variant.json).

    kind `atom` (atom=), `group` (group=), `composition` (atoms=, weights=), `random` (atom=: the
    atom whose norm it matches and seed it uses), `supervised` (behaviour=; atom= the atom whose
    norm it matches, default the atom chosen for that behaviour in `variants/choices.json`).
    Writing a variant that exists returns the existing folder's row (names are content-addressed)."""
    run_dir = Path(run_dir)
    if adapter_path is None:
        adapter_path = run_dir / "adapter" if cfg.finetune.enabled else cfg.model.adapter
        if adapter_path is None:
            raise ConfigError("no adapter: set model.adapter or enable the finetune stage")
    s = _cached_steerer(run_dir, cfg, Path(adapter_path))
    if kind == "atom" or kind == "random":
        if atom is None:
            raise ValueError(f"add_variant(kind={kind!r}) needs atom=")
        target = Target(kind, (int(atom),), (1.0,), None, behaviour)
    elif kind == "group":
        if group is None:
            raise ValueError("add_variant(kind='group') needs group=")
        target = s.group_target(group)
    elif kind == "composition":
        if not atoms:
            raise ValueError("add_variant(kind='composition') needs atoms=")
        w = list(weights) if weights is not None else [1.0] * len(atoms)
        target = Target("composition", tuple(int(a) for a in atoms), tuple(float(x) for x in w))
    elif kind == "supervised":
        if behaviour is None:
            raise ValueError("add_variant(kind='supervised') needs behaviour=")
        if atom is None:
            path = s.out / CHOICES_FILE
            chosen = json.loads(path.read_text()).get("choices", {}).get(behaviour) if path.exists() else None
            if not chosen:
                raise ValueError(f"add_variant: no atom chosen for {behaviour!r} in {path}; pass atom= (whose norm the direction takes)")
            atom = int(chosen["atom"])
        target = Target("supervised", (int(atom),), (1.0,), None, behaviour)
    else:
        raise ValueError(f"add_variant: kind must be atom, group, composition, random or supervised, got {kind!r}")
    m = mode or (cfg.steer.mode if cfg.steer.mode != "both" else "paper")
    row = s.write(target, sign, float(alpha), m, units=units)
    s.write_index()
    return row
