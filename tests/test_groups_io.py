"""groups/ I/O: the files round-trip with the documented schema."""

from __future__ import annotations

import pytest

from ga_ray.errors import StageError
from ga_ray.groups import io


def _row(g: int, atoms: list[int], parent: int | None) -> dict:
    return {
        "group": g, "atoms": atoms, "n_atoms": len(atoms), "n_documents": 10 * len(atoms),
        "top_doc_ids": [1, 2, 3], "top_scores": [3.0, 2.0, 1.0], "coherence": 0.5, "coherence_min": 0.4,
        "coherence_max": 0.6, "words": ["yes", "no"], "parent": parent, "level": 2, "leader": atoms[0],
    }


def test_roundtrip(tmp_path):
    assert not io.exists(tmp_path)
    with pytest.raises(StageError, match="run the groups stage"):
        io.load_groups(tmp_path)
    tree = {"atoms": [0, 1, 2], "linkage": [[0, 1, 0.1, 2], [2, 3, 0.5, 3]], "chosen": 2}
    io.save_groups(tmp_path / "groups", [_row(0, [0, 1], 0), _row(1, [2], None)], tree)
    assert io.exists(tmp_path)
    t = io.load_groups(tmp_path)
    assert t.schema == io.GROUPS_SCHEMA
    assert t.column("atoms").to_pylist() == [[0, 1], [2]]
    assert t.column("parent").to_pylist() == [0, None]
    assert io.load_tree(tmp_path) == tree
    assert io.group_members(tmp_path) == {0: [0, 1], 1: [2]}
    assert io.load_groups(tmp_path / "groups").num_rows == 2
