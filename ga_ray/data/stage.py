"""The prepare stage: read → validate → tokenise in Ray Data tasks → `data/` Parquet.

Layers: `readers` (I/O and row validation on the driver, which reads the file anyway and so knows
every row's file and line), `tokenize` (pure templating and masks), and this module (the Ray
wiring and the atomic write). Output, built in a temporary sibling folder and swapped into place:

- `data/part-NNNNN.parquet`: `doc_id` int64, `input_ids` list<int32>, `loss_mask` list<int8>,
  `n_tokens` int32, then the sidecar columns untouched; rows in `doc_id` order across the files
  in name order.
- `data/rejected.jsonl`: one line per rejected row (`file`, `line` or `row_index`, `doc_id`,
  `kind`, `reason`, and the `row` as read, or the raw `text` of a line that is not JSON). Empty
  when nothing was rejected.
- `data/prepare.json`: the counts.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ga_ray.data.errors import BadRow, count_by_kind, format_bad_rows, format_too_many_rejected, too_many_rejected
from ga_ray.data.readers import PROMPT_RESPONSE, Source, read_source
from ga_ray.data.tokenize import (
    COL_FILE,
    COL_KIND,
    COL_MESSAGES,
    COL_POS,
    COL_REASON,
    COL_SPECIAL,
    COL_TRUNCATED,
    COL_WHERE,
    INTERNAL_PREFIX,
    tokenize_table,
)
from ga_ray.errors import DataError, StageError
from ga_ray.kernel.loading import load_tokenizer
from ga_ray.context import StageContext
from ga_ray.raycluster import init_ray
from ga_ray.rundir import atomic_dir, atomic_write_json, atomic_write_text

log = logging.getLogger("ga_ray")

_DOCS_PER_BLOCK = 2000
_MAX_BLOCKS = 256
_TOKENIZERS: dict[str, Any] = {}


def _tokenize_batch(batch: pa.Table, tokenizer_ref: list[Any], max_length: int, special_text: str = "keep") -> pa.Table:
    """Ray Data task: the tokenizer is fetched once per worker process, then reused for every batch.

    Tasks rather than an actor pool: Ray reuses its worker processes across operators and stage
    runs, so the transformers import and the tokenizer load are paid once per worker, not once per
    actor start (which dominated the stage's time on small inputs).
    """
    import ray

    key = tokenizer_ref[0].hex()
    tok = _TOKENIZERS.get(key)
    if tok is None:
        _TOKENIZERS.clear()
        tok = _TOKENIZERS[key] = ray.get(tokenizer_ref[0])
    return tokenize_table(tok, batch, max_length, special_text)


def _block_stats(batch: pa.Table) -> pa.Table:
    good = pc.is_null(batch.column(COL_KIND))
    kept = batch.filter(good)
    flat_mask = pc.list_flatten(kept.column("loss_mask"))
    return pa.table(
        {
            "documents": [kept.num_rows],
            "tokens": [int(pc.sum(kept.column("n_tokens")).as_py() or 0)],
            "response_tokens": [int(pc.sum(pc.cast(flat_mask, pa.int64())).as_py() or 0)],
            "truncated": [int(pc.sum(pc.cast(kept.column(COL_TRUNCATED), pa.int64())).as_py() or 0)],
            "max_tokens": [int(pc.max(kept.column("n_tokens")).as_py() or 0)],
            # good rows with special-token text, and rows rejected for it (data.special_token_text: reject)
            "special_text_documents": [int(pc.sum(pc.greater(pc.list_value_length(batch.column(COL_SPECIAL)), 0)).as_py() or 0)],
        }
    )


def _special_text_only(batch: pa.Table) -> pa.Table:
    """The special-token texts found (one list per row that has any: good rows, and rows rejected for them)."""
    has = pc.greater(pc.list_value_length(batch.column(COL_SPECIAL)), 0)
    return batch.filter(has).select([COL_SPECIAL])


def _bad_rows_only(batch: pa.Table) -> pa.Table:
    bad = batch.filter(pc.invert(pc.is_null(batch.column(COL_KIND))))
    return bad.drop_columns(["input_ids", "loss_mask"])


def _good_rows_only(batch: pa.Table) -> pa.Table:
    good = batch.filter(pc.is_null(batch.column(COL_KIND)))
    return good.drop_columns([c for c in good.column_names if c.startswith(INTERNAL_PREFIX)])


def _default_blocks(n_rows: int, configured: int | None) -> int:
    if configured is not None:
        return max(1, min(configured, n_rows))
    return max(1, min(_MAX_BLOCKS, math.ceil(n_rows / _DOCS_PER_BLOCK)))


def _rejected_row(rec: dict[str, Any], source: Source, cfg: Any) -> dict[str, Any]:
    """The row of a tokeniser-rejected document, rebuilt in the source's own field names."""
    msgs = rec[COL_MESSAGES]
    if source.mode == PROMPT_RESPONSE:
        row: dict[str, Any] = {cfg.prompt_column: msgs[-2]["content"], cfg.response_column: msgs[-1]["content"]}
    else:
        row = {cfg.messages_column: msgs}
    if source.id_column:
        row[source.id_column] = rec["doc_id"]
    for name in source.sidecars:
        row[name] = rec.get(name)
    return row


def _write_ordered_parts(ds: Any, folder: Path) -> list[str]:
    """Write with Ray, then name the files part-00000… in doc_id order (and check the order)."""
    staging = folder / "_ray_parts"
    ds.write_parquet(str(staging))
    files = []
    for f in sorted(staging.glob("*.parquet")):
        ids = pq.read_table(f, columns=["doc_id"]).column("doc_id").to_numpy()
        if len(ids) == 0:
            continue
        files.append((int(ids[0]), int(ids[-1]), f, ids))
    files.sort(key=lambda x: x[0])
    previous, ordered = None, True
    for first, _, f, ids in files:
        if (len(ids) > 1 and not (ids[1:] > ids[:-1]).all()) or (previous is not None and first <= previous):
            ordered = False
            break
        previous = int(ids[-1])
    if not ordered:
        # Ray Data does not always keep the order even with preserve_order (seen once in a long test session):
        # sort on the driver instead of failing. data/ is read whole by later stages anyway.
        log.warning("prepare: Ray Data wrote rows out of doc_id order; sorting them on the driver")
        table = pa.concat_tables([pq.read_table(f) for _, _, f, _ in files]).sort_by("doc_id")
        ids = table.column("doc_id").to_numpy()
        if len(ids) > 1 and not (ids[1:] > ids[:-1]).all():
            raise RuntimeError("internal error: duplicate doc_id values reached the write; this is a bug")
        for _, _, f, _ in files:
            f.unlink()
        per_file = max(1, -(-table.num_rows // max(1, len(files))))
        files = []
        for i in range(0, table.num_rows, per_file):
            f = staging / f"sorted-{i:012d}.parquet"
            pq.write_table(table.slice(i, per_file), f)
            files.append((i, i, f, None))
    names = []
    for i, (_, _, f, _) in enumerate(files):
        name = f"part-{i:05d}.parquet"
        os.replace(f, folder / name)
        names.append(name)
    for leftover in staging.iterdir():
        leftover.unlink()
    staging.rmdir()
    return names


def run_prepare(ctx: StageContext) -> dict[str, Any]:
    import ray
    import ray.data

    cfg = ctx.cfg.data  # ranges (max_length >= 2, batch_size >= 1, ...) are checked when the config loads
    tokenizer = load_tokenizer(ctx.cfg.model)
    tok_path = ctx.cfg.model.tokenizer or ctx.cfg.model.path
    if not getattr(tokenizer, "chat_template", None):
        raise StageError(
            f"the tokenizer at {tok_path} has no chat template; prepare needs one to build prompts and "
            f"response masks. Save one with tokenizer.chat_template = ...; tokenizer.save_pretrained(...)"
        )
    source = read_source(cfg)
    table = source.table
    if cfg.skip_bad_rows and table.num_rows and too_many_rejected(len(source.bad), source.n_rows, cfg.max_rejected_share):
        # already too many before tokenising (which can only add more): stop before the Ray work
        raise DataError(format_too_many_rejected(source.bad, source.n_rows, cfg.max_rejected_share, source.description))

    stats = {"documents": 0, "tokens": 0, "response_tokens": 0, "truncated": 0, "max_tokens": 0, "special_text_documents": 0}
    special_counts: Counter[str] = Counter()
    worker_bad: list[BadRow] = []
    good_ds = None
    data_ctx = ray.data.DataContext.get_current()
    old_order = data_ctx.execution_options.preserve_order
    data_ctx.execution_options.preserve_order = True
    try:
        if table.num_rows:
            init_ray(ctx.cfg.ray)  # after the driver-side checks: a problem of the file fails in a second, without Ray
            n_blocks = _default_blocks(table.num_rows, cfg.num_blocks)
            step = math.ceil(table.num_rows / n_blocks)
            slices = [table.slice(i, step) for i in range(0, table.num_rows, step)]
            tok_ref = ray.put(tokenizer)
            tokenised = ray.data.from_arrow(slices).map_batches(
                _tokenize_batch,
                fn_kwargs={"tokenizer_ref": [tok_ref], "max_length": cfg.max_length, "special_text": cfg.special_token_text},
                batch_format="pyarrow",
                batch_size=cfg.batch_size,
                num_cpus=1,
                udf_modifying_row_count=False,
            )
            tokenised = tokenised.materialize()
            for row in tokenised.map_batches(_block_stats, batch_format="pyarrow", batch_size=None).take_all():
                for k in stats:
                    stats[k] = max(stats[k], int(row[k])) if k == "max_tokens" else stats[k] + int(row[k])
            if stats["special_text_documents"]:
                for rec in tokenised.map_batches(_special_text_only, batch_format="pyarrow", batch_size=None).take_all():
                    special_counts.update(rec[COL_SPECIAL])
            for rec in tokenised.map_batches(_bad_rows_only, batch_format="pyarrow", batch_size=None).take_all():
                worker_bad.append(
                    BadRow(
                        int(rec[COL_POS]),
                        rec[COL_FILE],
                        rec[COL_WHERE],
                        rec[COL_KIND],
                        rec[COL_REASON],
                        doc_id=int(rec["doc_id"]),
                        row=_rejected_row(rec, source, cfg),
                    )
                )
            good_ds = tokenised.map_batches(_good_rows_only, batch_format="pyarrow", batch_size=None)

        bad = sorted(source.bad + worker_bad, key=lambda b: b.pos)
        if bad and not cfg.skip_bad_rows:
            raise DataError(format_bad_rows(bad, source.description))
        if stats["documents"] == 0:
            raise DataError(format_bad_rows(bad, source.description, footer="No document is left to prepare: fix these rows."))
        if too_many_rejected(len(bad), source.n_rows, cfg.max_rejected_share):
            raise DataError(format_too_many_rejected(bad, source.n_rows, cfg.max_rejected_share, source.description))
        special_text = {
            "handling": cfg.special_token_text,
            "documents": stats.pop("special_text_documents"),
            "occurrences": dict(special_counts.most_common()),
        }

        with atomic_dir(ctx.out) as tmp:
            files = _write_ordered_parts(good_ds, tmp)
            atomic_write_text(tmp / "rejected.jsonl", "".join(json.dumps(b.record(), default=str) + "\n" for b in bad))
            rejected = count_by_kind(bad)
            report = {
                "source": source.description,
                "format": source.format,
                "mode": source.mode,
                "doc_ids": f"column '{source.id_column}'" if source.id_column else "row position",
                "tokenizer": str(tok_path),
                "max_length": cfg.max_length,
                "rows_read": source.n_rows,
                **stats,
                "rejected": len(bad),
                "rejected_by_reason": rejected,
                "skip_bad_rows": cfg.skip_bad_rows,
                "max_rejected_share": cfg.max_rejected_share,
                "special_token_text": special_text,
                "sidecars": source.sidecars,
                "files": files,
            }
            atomic_write_json(tmp / "prepare.json", report)
    finally:
        data_ctx.execution_options.preserve_order = old_order

    line = (
        f"{stats['documents']:,} documents, {stats['tokens']:,} tokens ({stats['response_tokens']:,} response), "
        f"{stats['truncated']:,} truncated to {cfg.max_length}, {len(bad):,} rejected"
    )
    if bad:
        line += " (see data/rejected.jsonl)"
    if special_text["documents"]:
        shown = ", ".join(f"{t} x{n}" for t, n in list(special_text["occurrences"].items())[:3])
        what = {
            "keep": "kept as control tokens (data.special_token_text=escape tokenises them as plain text)",
            "escape": "tokenised as plain text",
            "reject": "rejected",
        }[cfg.special_token_text]
        n_docs = special_text["documents"]
        note = f"{n_docs:,} document{'s' if n_docs != 1 else ''} spell{'' if n_docs != 1 else 's'} special tokens in its text"
        note = note.replace("its text", "their text") if n_docs != 1 else note
        note += (f" ({shown})" if shown else "") + f": {what}"
        line += f"; {note}"  # the summary line the CLI prints (and the manifest keeps)
    summary = {k: v for k, v in report.items() if k != "files"}
    summary["line"] = line
    return summary
