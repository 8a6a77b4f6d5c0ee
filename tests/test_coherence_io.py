"""ga_ray.coherence.io: the one owner of RUN_DIR/coherence/ (round trips, schema, errors a user can act on)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ga_ray.coherence import io as coherence_io
from ga_ray.errors import StageError
from ga_ray.rundir import RunDir


def _table(K: int = 4) -> pa.Table:
    return pa.table(
        {
            "atom": pa.array(np.arange(K, dtype=np.int32)),
            "coherence": pa.array([0.7, np.nan, 0.2, 0.05]),
            "n_active_docs": pa.array([5, 1, 3, 0], pa.int64()),
            "n_positive_docs": pa.array([4, 1, 3, 0], pa.int64()),
            "top_doc_ids": pa.array([[3, 1], [2], [0, 4, 5], []], pa.list_(pa.int64())),
            "top_coefs": pa.array([[0.9, 0.5], [0.1], [0.3, 0.2, 0.1], []], pa.list_(pa.float32())),
            "sign_flipped": pa.array([False, True, False, True]),
            "coef_sum": pa.array([1.4, 0.1, 0.6, 0.0]),
            "n_invalid_top_docs": pa.array([0, 0, 1, 0], pa.int64()),
        }
    )


def test_round_trip_through_the_run_directory(tmp_path):
    out = coherence_io.stage_dir(tmp_path)
    out.mkdir()
    assert out == tmp_path / "coherence" and not coherence_io.exists(RunDir(tmp_path))
    coherence_io.save_atom_table(out, _table())
    assert coherence_io.exists(tmp_path) and coherence_io.exists(RunDir(tmp_path))
    got = coherence_io.load_atom_table(RunDir(tmp_path))
    want = _table().to_pydict()
    have = got.drop(["sign"]).to_pydict()
    np.testing.assert_array_equal(have.pop("coherence"), want.pop("coherence"))  # NaN where unscored
    assert have == want
    assert got.column("sign").to_pylist() == [1.0, -1.0, 1.0, -1.0]

    D = np.arange(12, dtype=np.float32).reshape(4, 3)
    sign = np.array([1.0, -1.0, 1.0, -1.0], dtype=np.float32)
    coherence_io.save_oriented_dictionary(out, D, sign)
    Do, so = coherence_io.load_oriented_dictionary(tmp_path)
    np.testing.assert_array_equal(Do, D * sign[:, None])
    np.testing.assert_array_equal(so, sign)

    coherence_io.save_characterisation(out, {"atoms": {"0": {"keywords": ["a"]}}})
    assert coherence_io.load_characterisation(tmp_path) == {"atoms": {"0": {"keywords": ["a"]}}}
    assert coherence_io.load_discovery(tmp_path) is None
    coherence_io.save_discovery(out, {"n_families": 3})
    assert coherence_io.load_discovery(tmp_path) == {"n_families": 3}
    coherence_io.save_discovery(out, None)  # no label column any more: the old score goes
    assert coherence_io.load_discovery(tmp_path) is None and not (out / coherence_io.DISCOVERY).exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_a_table_of_another_schema_is_refused(tmp_path):
    with pytest.raises(ValueError, match="schema"):
        coherence_io.save_atom_table(tmp_path, _table().drop(["coef_sum"]))
    with pytest.raises(ValueError, match="schema"):
        coherence_io.save_atom_table(tmp_path, _table().set_column(0, "atom", pa.array(np.arange(4, dtype=np.int64))))


def test_missing_or_broken_files_say_what_to_run(tmp_path):
    with pytest.raises(StageError, match=r"coherence/atoms.parquet is missing.*ga-ray coherence"):
        coherence_io.load_atom_table(tmp_path)
    with pytest.raises(StageError, match="ga-ray coherence"):
        coherence_io.load_oriented_dictionary(tmp_path)
    with pytest.raises(StageError, match="characterisation.json is missing"):
        coherence_io.load_characterisation(tmp_path)
    assert coherence_io.load_characterisation(tmp_path, missing_ok=True) is None
    out = coherence_io.stage_dir(tmp_path)
    out.mkdir()
    pq.write_table(_table().drop(["n_invalid_top_docs"]), out / coherence_io.ATOM_TABLE)  # an older layout
    with pytest.raises(StageError, match="lacks column.*n_invalid_top_docs"):
        coherence_io.load_atom_table(tmp_path)
    (out / coherence_io.ATOM_TABLE).write_bytes(b"not parquet")
    with pytest.raises(StageError, match="not a readable Parquet"):
        coherence_io.load_atom_table(tmp_path)
    (out / coherence_io.CHARACTERISATION).write_text("{truncated")
    with pytest.raises(StageError, match="not valid JSON"):
        coherence_io.load_characterisation(tmp_path)


def test_a_done_stage_whose_folder_is_gone_runs_again(tmp_path):
    """A run made before the coherence stage had its own folder has a `done` coherence record but no coherence/:
    the runner runs the stage again (and so everything that reads it) instead of skipping it."""
    from ga_ray.config import load_config
    from ga_ray.pipeline import Stage, run_pipeline

    calls: list[str] = []

    def write(ctx):
        calls.append(ctx.stage)
        (ctx.out / "out.txt").write_text(ctx.stage)
        return {"line": ctx.stage}

    registry = (Stage("first", write, "first", ("report",)), Stage("second", write, "second", ("report",), upstream=("first",)))
    cfg, rd = load_config(None, []), RunDir(tmp_path / "run")
    run_pipeline(cfg, rd, registry=registry)
    run_pipeline(cfg, rd, registry=registry)
    assert calls == ["first", "second"]  # the second run skipped both
    import shutil

    shutil.rmtree(rd.stage_dir("first"))
    run_pipeline(cfg, rd, registry=registry)
    assert calls == ["first", "second", "first", "second"]  # first ran again, and so did what reads it
