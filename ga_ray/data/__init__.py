"""The prepare stage and the `data/` format.

- `readers`: JSONL / Parquet / `datasets.save_to_disk` sources → validated chats, doc ids, sidecars.
- `tokenize`: chat template, response-only loss mask, truncation (pure).
- `errors`: bad rows, their kinds and the message that lists them.
- `stage`: `run_prepare(ctx)`, the Ray Data wiring and the atomic write.
- `io`: the one reader of `data/` for every stage (`part_files`, `parquet_paths`, `read_documents`,
  `read_doc_ids`, `count_documents`, `read_prepared`, `read_prepare_report`, `exists`).
- `collate`: padding prepared rows into a batch.
"""
