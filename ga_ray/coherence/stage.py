"""coherence stage: orient the atoms, score their coherence on RAW gradients, characterise them.

Reads `atoms/dictionary.safetensors` and `atoms/codes.parquet` (the atoms stage), the model and
adapter, and `data/` (token ids and loss masks only). Writes its own folder `coherence/` through
`ga_ray.coherence.io` (the one module that knows its files and schema; readers use it too):
`dictionary_oriented.safetensors`, `atoms.parquet`, `characterisation.json` and, only when `data/`
has the `coherence.label_column` (see `discovery.py`), `discovery.json`, computed last; the label
column is read nowhere else. Nothing is written into `atoms/`, so re-running the atoms stage never
leaves an old coherence result beside new atoms.

Ray wiring: the work is a list of atom groups (`coherence.plan_groups`); a Ray Data `map_batches`
over an actor pool (`CoherenceActor`, `compute=ActorPoolStrategy`, `gpus_per_worker` per actor) gives each
actor whole groups. An actor recomputes its group's documents' raw LoRA gradients with the one-pass
per-document machinery, batch by batch, keeps Σu per atom of the group, and returns per-atom scalars.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ga_ray.coherence.coherence import Group, GroupAccumulator, flatten_unit, plan_groups
from ga_ray.coherence.orient import active_counts, orient, oriented_coefs, positive_counts, top_documents
from ga_ray.atoms import io as atoms_io
from ga_ray.coherence import io as coherence_io
from ga_ray.data import io as data_io
from ga_ray.finetune.io import adapter_num_params
from ga_ray.errors import StageError
from ga_ray.context import StageContext

log = logging.getLogger("ga_ray")

DOC_COLUMNS = list(data_io.TOKEN_COLUMNS)  # the only data/ columns read before the discovery score


# -------------------------------------------------------------------- compute (no Ray, no files)


class CoherenceComputer:
    """Runs coherence groups on one model: raw per-document gradients, batch by batch."""

    def __init__(self, model: Any, blocks: Sequence[Any], *, max_docs: int = 16, max_tokens: int = 4096, pad_id: int | None = None):
        self.model = model
        self.blocks = list(blocks)
        self.order = [b.name for b in self.blocks]
        self.P = int(sum(b.numel for b in self.blocks))
        self.device = next(model.parameters()).device
        self.max_docs = int(max_docs)
        self.max_tokens = int(max_tokens)
        if pad_id is None:
            pad_id = getattr(getattr(model, "config", None), "pad_token_id", None)
        self.pad_id = int(pad_id) if pad_id is not None else 0

    def run_group(self, group: Group, docs: Mapping[int, tuple[Sequence[int], Sequence[int]]]) -> dict[str, Any]:
        from ga_ray.kernel.collate import collate
        from ga_ray.kernel.batching import plan_batches
        from ga_ray.kernel.per_document import per_document_gradients

        acc = GroupAccumulator(group, self.P, device=self.device)
        ids = list(group.doc_ids)
        lengths = np.asarray([len(docs[d][0]) for d in ids], dtype=np.int64)
        t0 = time.perf_counter()
        for idx in plan_batches(lengths, self.max_docs, self.max_tokens):
            rows = [{"doc_id": ids[i], "input_ids": docs[ids[i]][0], "loss_mask": docs[ids[i]][1]} for i in idx]
            batch = collate(rows, pad_id=self.pad_id).to(self.device)
            res = per_document_gradients(self.model, self.blocks, batch, labels="empirical", reduction="sum")
            U, _, valid = flatten_unit(res.grads, self.order)
            del res
            acc.add([ids[i] for i in idx], U, valid)
            del U, batch
        out = acc.result()
        out["n_docs"] = len(ids)
        out["seconds"] = time.perf_counter() - t0
        return out


# --------------------------------------------------------------------------------- Ray wiring


class CoherenceActor:
    """Ray Data callable class: model + adapter loaded once per actor; one group per row."""

    def __init__(self, model_cfg: dict[str, Any], adapter_path: str, max_docs: int, max_tokens: int, use_gpu: bool, dtype: str | None, threads: int):
        import torch

        from ga_ray.config import ModelConfig
        from ga_ray.kernel.loading import load_lora_model
        from ga_ray.kernel.lora_blocks import find_lora_blocks

        torch.set_num_threads(max(1, int(threads)))
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        model = load_lora_model(ModelConfig(**model_cfg), adapter_path, device=device, dtype=dtype)
        self.computer = CoherenceComputer(model, find_lora_blocks(model), max_docs=max_docs, max_tokens=max_tokens)

    def __call__(self, batch: pa.Table) -> pa.Table:
        out: dict[str, list] = {k: [] for k in ("group", "atom", "sq_norm_sum", "unit_count", "k", "coherence", "invalid_docs", "n_docs", "seconds", "n_params")}
        for row in batch.to_pylist():
            group = Group(atoms=list(row["atoms"]), members=[list(m) for m in row["members"]], doc_ids=list(row["doc_ids"]))
            docs = {int(d): (ids, mask) for d, ids, mask in zip(row["doc_ids"], row["input_ids"], row["loss_mask"])}
            res = self.computer.run_group(group, docs)
            for i, a in enumerate(res["atom"]):
                out["group"].append(int(row["group"]))
                out["atom"].append(int(a))
                out["sq_norm_sum"].append(float(res["sq_norm_sum"][i]))
                out["unit_count"].append(float(res["unit_count"][i]))
                out["k"].append(int(res["k"][i]))
                out["coherence"].append(float(res["coherence"][i]))
                out["invalid_docs"].append([d for d in res["invalid_docs"] if d in set(group.members[i])])
                out["n_docs"].append(int(res["n_docs"]))
                out["seconds"].append(float(res["seconds"]))
                out["n_params"].append(int(self.computer.P))
        return pa.table(
            {
                "group": pa.array(out["group"], pa.int64()),
                "atom": pa.array(out["atom"], pa.int64()),
                "sq_norm_sum": pa.array(out["sq_norm_sum"], pa.float64()),
                "unit_count": pa.array(out["unit_count"], pa.float64()),
                "k": pa.array(out["k"], pa.int64()),
                "coherence": pa.array(out["coherence"], pa.float64()),
                "invalid_docs": pa.array(out["invalid_docs"], pa.list_(pa.int64())),
                "n_docs": pa.array(out["n_docs"], pa.int64()),
                "seconds": pa.array(out["seconds"], pa.float64()),
                "n_params": pa.array(out["n_params"], pa.int64()),
            }
        )


@dataclass
class CoherenceResult:
    coherence: np.ndarray  # [n_items] float64 (NaN: fewer than 2 top documents)
    k: np.ndarray  # [n_items] top documents used
    n_invalid: np.ndarray  # [n_items] top documents with a zero / non-finite raw gradient
    stats: dict[str, Any] = field(default_factory=dict)


def compute_coherence(cfg: Any, data_dir: Path, adapter_path: Path, top_doc_ids: Sequence[Sequence[int]]) -> CoherenceResult:
    """Coherence of every item (atom) from its top documents, on a Ray Data actor pool.

    Only the union of the top documents is read and recomputed; memory per actor is bounded by
    `coherence.group_memory_mb` (the per-atom sums) plus one batch of raw gradients.
    """
    import ray

    from ga_ray.raycluster import init_ray
    from ga_ray.resources import plan_workers

    cc = cfg.coherence
    n = len(top_doc_ids)
    coh = np.full(n, np.nan)
    ks = np.asarray([len(t) for t in top_doc_ids], dtype=np.int64)
    n_invalid = np.zeros(n, dtype=np.int64)
    t0 = time.perf_counter()
    P = adapter_num_params(adapter_path)
    per_atom_bytes = 4 * (P or 1)
    max_atoms = max(1, int(cc.group_memory_mb * 2**20 // per_atom_bytes)) if P else 64
    groups = plan_groups({i: list(t) for i, t in enumerate(top_doc_ids)}, max_atoms, min_groups=max(1, cc.num_workers))
    stats: dict[str, Any] = {"n_params": P, "n_groups": len(groups), "atoms_per_group_max": max_atoms}
    if not groups:
        stats.update(n_union=0, n_computed=0, seconds=0.0)
        return CoherenceResult(coh, ks, n_invalid, stats)

    union = sorted({d for g in groups for d in g.doc_ids})
    table = data_io.read_documents(data_dir, union, columns=DOC_COLUMNS)
    docs = {int(d): (ids, m) for d, ids, m in zip(table.column("doc_id").to_pylist(), table.column("input_ids").to_pylist(), table.column("loss_mask").to_pylist())}
    missing = [d for d in union if d not in docs]
    if missing:
        raise StageError(
            f"{len(missing)} top documents of the atoms are not in {data_dir} (e.g. doc_id {missing[:5]}): "
            "the atoms were fitted on other data; re-run the gradients and atoms stages"
        )
    items = []
    for gi, g in enumerate(groups):
        items.append(
            {
                "group": gi,
                "atoms": [int(a) for a in g.atoms],
                "members": [[int(d) for d in m] for m in g.members],
                "doc_ids": [int(d) for d in g.doc_ids],
                "input_ids": [[int(t) for t in docs[d][0]] for d in g.doc_ids],
                "loss_mask": [[int(t) for t in docs[d][1]] for d in g.doc_ids],
            }
        )
    init_ray(cfg.ray)
    workers = plan_workers("coherence", cc, num_workers=max(1, min(cc.num_workers, len(items))))
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        CoherenceActor,
        fn_constructor_kwargs={
            "model_cfg": cfg.model.model_dump(),
            "adapter_path": str(adapter_path),
            "max_docs": cc.batch_size,
            "max_tokens": cc.max_tokens_per_batch,
            "use_gpu": workers.use_gpu,
            "dtype": "float32" if cc.dtype == "float32" else None,
            "threads": workers.torch_threads,
        },
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=workers.num_workers),
        num_gpus=workers.gpus_per_worker,
        num_cpus=workers.cpus_per_worker,
    )
    rows = ds.take_all()
    seen_groups: dict[int, tuple[int, float]] = {}
    for r in rows:
        a = int(r["atom"])
        coh[a] = float(r["coherence"]) if r["coherence"] is not None else np.nan
        n_invalid[a] = len(r["invalid_docs"] or [])
        seen_groups[int(r["group"])] = (int(r["n_docs"]), float(r["seconds"]))
    if len(seen_groups) != len(groups):
        raise RuntimeError(f"coherence: {len(groups) - len(seen_groups)} of {len(groups)} groups returned no result")
    n_computed = sum(v[0] for v in seen_groups.values())
    stats.update(
        n_union=len(union),
        n_computed=n_computed,
        recompute_factor=round(n_computed / max(1, len(union)), 3),
        actor_seconds=round(sum(v[1] for v in seen_groups.values()), 3),
        seconds=round(time.perf_counter() - t0, 3),
        num_actors=workers.num_workers,
        num_gpus_per_actor=workers.gpus_per_worker,
        invalid_top_docs=int(n_invalid.sum()),
    )
    return CoherenceResult(coh, ks, n_invalid, stats)


# ------------------------------------------------------------------------------- characterisation


def _decoder(cfg: Any) -> tuple[Any, str]:
    from ga_ray.coherence.characterise import Decoder

    try:
        from ga_ray.kernel.loading import load_tokenizer

        tok = load_tokenizer(cfg.model)
        return Decoder(tok), str(cfg.model.tokenizer or cfg.model.path)
    except Exception as exc:  # no tokenizer: show token ids, and say why
        log.warning("coherence: no tokenizer (%s); excerpts show token ids", exc)
        return Decoder(None), f"none ({type(exc).__name__}: {exc})"


def characterise(cfg: Any, data_dir: Path, top_doc_ids: Sequence[Sequence[int]], coherence: np.ndarray) -> dict[str, Any]:
    """characterisation.json content: excerpts, keywords, optional labels."""
    from ga_ray.coherence.characterise import characterise_atoms, label_atoms, sample_ids, split_prompt_response

    cc = cfg.coherence
    t0 = time.perf_counter()
    decoder, tok_desc = _decoder(cfg)
    all_ids = data_io.read_documents(data_dir, columns=["doc_id"]).column("doc_id").to_numpy()
    bg_ids = sample_ids(all_ids, cc.background_docs, seed=cfg.seed)
    need = sorted({int(d) for t in top_doc_ids for d in t} | {int(d) for d in bg_ids})
    table = data_io.read_documents(data_dir, need, columns=DOC_COLUMNS)
    docs = {int(d): (ids, m) for d, ids, m in zip(table.column("doc_id").to_pylist(), table.column("input_ids").to_pylist(), table.column("loss_mask").to_pylist())}
    bg_resp = decoder.many([split_prompt_response(*docs[int(d)])[1] for d in bg_ids]) if len(bg_ids) else []
    per_atom = characterise_atoms(
        top_doc_ids, docs, bg_resp, decoder, n_examples=cc.examples_per_atom, excerpt_chars=cc.excerpt_chars, n_keywords=cc.n_keywords
    )
    out: dict[str, Any] = {
        "tokenizer": tok_desc,
        "background_docs": int(len(bg_ids)),
        "keywords_method": "log-odds with an informative Dirichlet prior (Monroe et al. 2008), top responses vs all responses",
        "label_endpoint": cc.label_endpoint,
        "label_model": cc.label_model,
        "labels": {"requested": 0, "ok": 0, "errors": 0},
    }
    if cc.label_endpoint:
        order = [int(k) for k in np.argsort(-np.nan_to_num(coherence, nan=-np.inf), kind="stable") if len(top_doc_ids[k]) > 0]
        chosen = order[: cc.label_top_atoms]
        res = label_atoms(per_atom, chosen, cc.label_endpoint, cc.label_model, timeout_s=cc.label_timeout_s, api_key_env=cc.label_api_key_env)
        out["labels"] = {"requested": len(res), "ok": sum(1 for r in res.values() if r["label"]), "errors": sum(1 for r in res.values() if r["error"])}
    out["seconds"] = round(time.perf_counter() - t0, 3)
    out["atoms"] = {str(k): v for k, v in per_atom.items()}
    return out


# -------------------------------------------------------------------------------------- discovery


def score_discovery(cfg: Any, data_dir: Path, atoms_dir: Path, code_doc, code_atom, oriented, n_atoms, top_doc_ids, coherence) -> dict[str, Any] | None:
    """The discovery score, or None when there is no label column. The ONLY reader of the label."""
    from ga_ray.coherence.discovery import Families, discovery_scores, read_labels

    column = cfg.coherence.label_column
    if not column:
        return None
    labels = read_labels(data_dir, column)
    if labels is None:
        return None
    fam = Families(*labels)
    out = discovery_scores(
        fam, code_doc, code_atom, oriented, n_atoms, top_doc_ids, coherence, kmeans=atoms_io.load_kmeans(atoms_dir), top_n=cfg.coherence.top_docs
    )
    out["label_column"] = column
    return out


# ---------------------------------------------------------------------------------------- stage


def orient_and_rank(atoms_dir: Path, top_n: int) -> dict[str, Any]:
    """Orientation, counts and top documents from atoms/ (pure bookkeeping, shared with the sweep)."""
    D = atoms_io.load_dictionary_array(atoms_dir)
    doc, atom, coef = atoms_io.load_codes(atoms_dir)
    K = int(D.shape[0])
    o = orient(atom, coef, K)
    oc = oriented_coefs(atom, coef, o)
    top_ids, top_coefs = top_documents(doc, atom, oc, K, top_n)
    return {
        "dictionary": D,
        "orientation": o,
        "doc": doc,
        "atom": atom,
        "oriented": oc,
        "K": K,
        "top_ids": top_ids,
        "top_coefs": top_coefs,
        "n_active": active_counts(atom, coef, K),
        "n_positive": positive_counts(atom, oc, K),
    }


def atoms_table(r: dict[str, Any], res: CoherenceResult) -> pa.Table:
    K = r["K"]
    return pa.table(
        {
            "atom": pa.array(np.arange(K, dtype=np.int32)),
            "coherence": pa.array(res.coherence.astype(np.float64)),
            "n_active_docs": pa.array(r["n_active"].astype(np.int64)),
            "n_positive_docs": pa.array(r["n_positive"].astype(np.int64)),
            "top_doc_ids": pa.array(r["top_ids"], pa.list_(pa.int64())),
            "top_coefs": pa.array(r["top_coefs"], pa.list_(pa.float32())),
            "sign_flipped": pa.array(r["orientation"].flipped),
            "coef_sum": pa.array(r["orientation"].coef_sum.astype(np.float64)),
            "n_invalid_top_docs": pa.array(res.n_invalid.astype(np.int64)),
        }
    )


def coherence_counts(coherence: np.ndarray) -> dict[str, int]:
    c = np.asarray(coherence, dtype=np.float64)
    fin = np.isfinite(c)
    return {"gt_0.5": int((c[fin] > 0.5).sum()), "gt_0.1": int((c[fin] > 0.1).sum()), "scored": int(fin.sum()), "total": int(len(c))}


def run_coherence(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.cfg
    cc = cfg.coherence
    atoms_dir = ctx.stage_dir("atoms")
    out = ctx.out
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    t = time.perf_counter()
    r = orient_and_rank(atoms_dir, cc.top_docs)
    o = r["orientation"]
    coherence_io.save_oriented_dictionary(out, r["dictionary"], o.sign)
    timings["orient_s"] = round(time.perf_counter() - t, 3)

    res = compute_coherence(cfg, ctx.data_dir, ctx.adapter_path(), r["top_ids"])
    timings["coherence_s"] = res.stats.get("seconds", 0.0)
    coherence_io.save_atom_table(out, atoms_table(r, res))

    t = time.perf_counter()
    char = characterise(cfg, ctx.data_dir, r["top_ids"], res.coherence)
    coherence_io.save_characterisation(out, char)
    timings["characterise_s"] = round(time.perf_counter() - t, 3)

    # the discovery score: last, and the only step that reads the label column
    t = time.perf_counter()
    disc = score_discovery(cfg, ctx.data_dir, atoms_dir, r["doc"], r["atom"], r["oriented"], r["K"], r["top_ids"], res.coherence)
    coherence_io.save_discovery(out, disc)  # None removes a score from earlier data
    timings["discovery_s"] = round(time.perf_counter() - t, 3)

    counts = coherence_counts(res.coherence)
    top5 = [int(k) for k in np.argsort(-np.nan_to_num(res.coherence, nan=-np.inf), kind="stable")[:5] if np.isfinite(res.coherence[k])]
    summary: dict[str, Any] = {
        "n_atoms": r["K"],
        "n_flipped": int(o.flipped.sum()),
        "coherence_gt_0.5": counts["gt_0.5"],
        "coherence_gt_0.1": counts["gt_0.1"],
        "n_scored": counts["scored"],
        "top_atoms": [{"atom": k, "coherence": round(float(res.coherence[k]), 4)} for k in top5],
        "compute": res.stats,
        "timings": timings,
        "wall_s": round(time.perf_counter() - t_start, 3),
        "labels": char["labels"],
        "discovery": None,
    }
    line = (
        f"{r['K']} atoms ({summary['n_flipped']} flipped), coherence > 0.5: {counts['gt_0.5']}, > 0.1: {counts['gt_0.1']} "
        f"(of {counts['scored']} scored); {res.stats.get('n_union', 0)} top documents recomputed"
    )
    if disc is not None:
        a, b = disc["atoms_best"], disc["atoms_union"]
        summary["discovery"] = {
            "mean_best_f1": round(a["mean_f1"], 4),
            "n_recovered_best": a["n_recovered"],
            "mean_union_f1": round(b["mean_f1"], 4),
            "n_recovered_union": b["n_recovered"],
            "n_families": disc["n_families"],
        }
        line += f"; discovery: {b['n_recovered']}/{disc['n_families']} families at F1 >= 0.5 (union), mean best F1 {a['mean_f1']:.3f}"
        if "kmeans" in disc:
            line += f" vs k-means {disc['kmeans']['best']['mean_f1']:.3f}"
    else:
        line += f"; no label column {cc.label_column!r} in data/: discovery score skipped" if cc.label_column else "; discovery score off"
    summary["line"] = line
    return summary
