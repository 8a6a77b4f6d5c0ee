"""The prepare stage and the `data/` format.

- `readers`: JSONL / Parquet / `datasets.save_to_disk` sources → validated chats, doc ids, sidecars.
- `tokenize`: chat template, response-only loss mask, truncation (pure).
- `errors`: bad rows, their kinds and the message that lists them.
- `stage`: `run_prepare(ctx)`, the Ray Data wiring and the atomic write.
- `io`: reading `data/` back (`read_prepared`, `part_files`, `read_prepare_report`).
- `collate`: padding prepared rows into a batch.
"""
