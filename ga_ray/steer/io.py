"""The `variants/` format: one PEFT adapter folder per steered variant, plus an index.

`RUN_DIR/variants/<name>/` holds `adapter_config.json`, `adapter_model.safetensors` and
`variant.json` (the variant's metadata row, the same columns as the index). A folder is built under
a dot-prefixed temporary name and renamed into place, so every non-dot folder present is complete;
a folder is never overwritten in place (a server may have it loaded): its name ends with a hash of
its content, so a second write of the same content finds the folder there and keeps it, and
different contents get different names.

Names are readable: `atom469-toward-a2-<hash8>`, `atom469-away-a0.5-<hash8>`,
`group3-toward-a1-<hash8>`, `comp469x1+299x0.5-toward-a2-<hash8>`, `random469-toward-a2-<hash8>`,
`supervised-bullets-toward-a2-<hash8>`, `baseline-<hash8>`. α is written in its shortest exact
decimal form (1.5 → `a1.5`, 2.0 → `a2`, 2.5 → `a2.5`), never rounded to one digit. A non-default
mode or unit is appended (`-linear`, `a0.1rel`).

`variants/index.parquet` columns (`INDEX_SCHEMA`): name, kind, atoms, weights, group, behaviour,
sign, alpha, units, mode, v_norm, delta_norm, rel_delta, rank, content_hash, path (relative to the
run directory). `list_variants` reads the folders themselves (so variants added while a server runs
appear); `read_index` reads the Parquet index that the steer stage writes at its end.

Plain files only: JSON, safetensors, Parquet; no Ray, no model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ga_ray.errors import DataError
from ga_ray.rundir import atomic_write_bytes

VARIANTS_DIR = "variants"
INDEX_FILE = "index.parquet"
META_FILE = "variant.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MERGED_DIR = "merged"

KINDS = ("baseline", "atom", "group", "composition", "random", "supervised")
SIGNS = ("none", "toward", "away")
UNITS = ("absolute", "relative")
MODES = ("paper", "linear")

INDEX_SCHEMA = pa.schema(
    [
        ("name", pa.string()),
        ("kind", pa.string()),
        ("atoms", pa.list_(pa.int64())),
        ("weights", pa.list_(pa.float64())),
        ("group", pa.int64()),
        ("behaviour", pa.string()),
        ("sign", pa.string()),
        ("alpha", pa.float64()),
        ("units", pa.string()),
        ("mode", pa.string()),
        ("v_norm", pa.float64()),
        ("delta_norm", pa.float64()),
        ("rel_delta", pa.float64()),
        ("rank", pa.int64()),
        ("content_hash", pa.string()),
        ("path", pa.string()),
    ]
)
INDEX_COLUMNS = tuple(INDEX_SCHEMA.names)


# ------------------------------------------------------------------------------------ names, hashes


def format_alpha(alpha: float) -> str:
    """Shortest decimal that round-trips: 2.0 → "2", 1.5 → "1.5", 0.05 → "0.05" (never `:.0e`)."""
    return np.format_float_positional(float(alpha), trim="-", unique=True)


def variant_stem(
    kind: str,
    sign: str = "none",
    alpha: float = 0.0,
    atoms: Iterable[int] = (),
    weights: Iterable[float] = (),
    group: int | None = None,
    behaviour: str | None = None,
    units: str = "absolute",
    mode: str = "paper",
) -> str:
    """The readable part of a variant name (the content hash is appended by `variant_name`)."""
    if kind not in KINDS:
        raise ValueError(f"variant kind {kind!r}: choose one of {', '.join(KINDS)}")
    if kind == "baseline":
        return "baseline"
    if sign not in ("toward", "away"):
        raise ValueError(f"a {kind} variant needs sign toward or away, got {sign!r}")
    atoms, weights = list(atoms), list(weights)
    if kind == "atom":
        head = f"atom{atoms[0]}"
    elif kind == "group":
        head = f"group{group}"
    elif kind == "composition":
        head = "comp" + "+".join(f"{a}x{format_alpha(w)}" for a, w in zip(atoms, weights))
    elif kind == "random":
        head = f"random{atoms[0]}" if atoms else f"random-g{group}"
    else:  # supervised
        head = f"supervised-{behaviour}"
    a = f"a{format_alpha(alpha)}" + ("rel" if units == "relative" else "")
    tail = "-linear" if mode == "linear" else ""
    return f"{head}-{sign}-{a}{tail}"


def content_hash(tensors: Mapping[str, torch.Tensor], adapter_config: Mapping[str, Any]) -> str:
    """sha256 over the adapter config (canonical JSON) and every tensor (key, dtype, shape, bytes), keys sorted."""
    h = hashlib.sha256()
    h.update(json.dumps(adapter_config, sort_keys=True, default=str).encode("utf-8"))
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(key.encode("utf-8"))
        h.update(str(t.dtype).encode("utf-8"))
        h.update(str(tuple(t.shape)).encode("utf-8"))
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def variant_name(stem: str, chash: str) -> str:
    return f"{stem}-{chash[:8]}"


# ------------------------------------------------------------------------------------------ paths


def variants_dir(run_dir_or_variants_dir: str | Path) -> Path:
    """`RUN_DIR/variants` for a run directory, or the folder itself when it is a variants folder."""
    p = Path(run_dir_or_variants_dir)
    if (p / VARIANTS_DIR).is_dir() or (p / "manifest.json").exists():
        return p / VARIANTS_DIR
    return p


# ----------------------------------------------------------------------------------------- writing


def _normalise_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    row = {c: meta.get(c) for c in INDEX_COLUMNS}
    row["atoms"] = [int(a) for a in (row["atoms"] or [])]
    row["weights"] = [float(w) for w in (row["weights"] or [])]
    row["group"] = None if row["group"] is None else int(row["group"])
    for c in ("alpha", "v_norm", "delta_norm", "rel_delta"):
        row[c] = None if row[c] is None else float(row[c])
    row["rank"] = None if row["rank"] is None else int(row["rank"])
    extra = {k: v for k, v in meta.items() if k not in INDEX_COLUMNS}
    return {**row, **extra}


def _save_adapter(folder: Path, tensors: Mapping[str, torch.Tensor], adapter_config: Mapping[str, Any]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(dict(adapter_config), indent=2, sort_keys=True) + "\n")


def _fsync_dir(folder: Path) -> None:
    for f in folder.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def write_variant(
    out_dir: str | Path,
    stem: str,
    tensors: Mapping[str, torch.Tensor],
    adapter_config: Mapping[str, Any],
    meta: Mapping[str, Any],
    merge_fn: Any = None,
) -> dict[str, Any]:
    """Write one variant folder atomically; returns its metadata row (as in `variant.json`).

    `out_dir`: the variants folder. `tensors`: the adapter file's keys → tensors. `meta`: the index
    columns (name, content_hash and path are filled in here) plus any extra JSON-able keys.
    `merge_fn(folder)`: when given, writes a merged full-model copy into `folder` (the `merged/`
    subfolder, built before the rename so it is atomic with the rest).
    If the folder already exists it has the same content (the hash is in its name): it is kept as it
    is and its row returned (a `merged/` copy is added beside it when asked and missing).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chash = content_hash(tensors, adapter_config)
    name = variant_name(stem, chash)
    final = out_dir / name
    if (final / META_FILE).exists():
        row = read_variant(final)
        if row.get("content_hash") != chash:  # only a hand-edited folder gets here
            raise DataError(f"{final}: its variant.json has content hash {row.get('content_hash')}, its name says {chash[:8]}: remove the folder")
        if merge_fn is not None and not (final / MERGED_DIR).exists():
            tmp_m = final / f".{MERGED_DIR}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                merge_fn(tmp_m)
                os.rename(tmp_m, final / MERGED_DIR)
            finally:
                shutil.rmtree(tmp_m, ignore_errors=True)
        return row
    run_root = out_dir.parent if out_dir.name == VARIANTS_DIR else out_dir
    row = _normalise_meta({**meta, "name": name, "content_hash": chash, "path": str(final.relative_to(run_root))})
    tmp = out_dir / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _save_adapter(tmp, tensors, adapter_config)
        if merge_fn is not None:
            merge_fn(tmp / MERGED_DIR)
        (tmp / META_FILE).write_text(json.dumps(row, indent=2) + "\n")  # last: its presence marks completeness
        _fsync_dir(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / META_FILE).exists():  # a concurrent writer of the same content finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return row


# ----------------------------------------------------------------------------------------- reading


def read_variant(folder: str | Path) -> dict[str, Any]:
    """The metadata row of one variant folder (its `variant.json`), plus `dir` (absolute path)."""
    folder = Path(folder)
    try:
        row = json.loads((folder / META_FILE).read_text())
    except FileNotFoundError:
        raise DataError(f"{folder} is not a complete variant folder (no {META_FILE}): re-run `ga-ray steer`") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{folder / META_FILE}: not valid JSON ({exc}): remove the folder and re-run `ga-ray steer`") from None
    row["dir"] = str(folder.resolve())
    return row


def list_variants(run_dir_or_variants_dir: str | Path) -> list[dict[str, Any]]:
    """Every complete variant folder's row (non-dot folders with a `variant.json`), sorted by name."""
    vdir = variants_dir(run_dir_or_variants_dir)
    if not vdir.is_dir():
        return []
    rows = []
    for child in sorted(vdir.iterdir()):
        if child.name.startswith(".") or not child.is_dir() or not (child / META_FILE).is_file():
            continue
        rows.append(read_variant(child))
    return rows


def index_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    rows = [_normalise_meta(r) for r in rows]
    return pa.Table.from_pylist([{c: r[c] for c in INDEX_COLUMNS} for r in rows], schema=INDEX_SCHEMA)


def write_index(run_dir_or_variants_dir: str | Path, rows: Iterable[Mapping[str, Any]] | None = None) -> Path:
    """Write `variants/index.parquet` atomically (default rows: every complete folder now present)."""
    vdir = variants_dir(run_dir_or_variants_dir)
    rows = list_variants(vdir) if rows is None else list(rows)
    sink = pa.BufferOutputStream()
    pq.write_table(index_table(rows), sink)
    path = vdir / INDEX_FILE
    atomic_write_bytes(path, sink.getvalue().to_pybytes())
    return path


def read_index(run_dir_or_variants_dir: str | Path) -> list[dict[str, Any]]:
    """Rows of `variants/index.parquet` (written at the end of the steer stage)."""
    path = variants_dir(run_dir_or_variants_dir) / INDEX_FILE
    if not path.exists():
        raise DataError(f"{path} is missing: run the steer stage first (`ga-ray steer RUN_DIR`)")
    return pq.read_table(str(path)).to_pylist()


def load_adapter_tensors(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors keyed as in the adapter file, adapter_config dict) of a PEFT adapter folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    weights, config = folder / ADAPTER_WEIGHTS, folder / ADAPTER_CONFIG
    if not weights.exists() or not config.exists():
        raise DataError(f"{folder} is not a PEFT adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}; .bin adapters are not read)")
    return load_file(str(weights)), json.loads(config.read_text())
