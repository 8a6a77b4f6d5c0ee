"""The variants/ format: atomic, content-addressed, readable folders and the index."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ga_ray.steer import io as vio


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"base_model.model.layer.lora_A.weight": torch.randn(4, 8, generator=g), "base_model.model.layer.lora_B.weight": torch.randn(8, 4, generator=g)}


CFG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "base_model_name_or_path": "/m"}


def _meta(**kw):
    return {"kind": "atom", "atoms": [3], "weights": [1.0], "sign": "toward", "alpha": 2.0, "units": "absolute", "mode": "paper", "rank": 4, **kw}


@pytest.mark.parametrize("alpha,text", [(2.0, "2"), (1.5, "1.5"), (2.5, "2.5"), (0.5, "0.5"), (10.0, "10"), (0.05, "0.05"), (1e-7, "0.0000001")])
def test_format_alpha_exact(alpha, text):
    assert vio.format_alpha(alpha) == text


def test_alpha_names_never_collide():
    stems = {vio.variant_stem("atom", "toward", a, atoms=[469]) for a in (1.5, 2.0, 2.5, 1.0, 0.5, 5.0, 10.0)}
    assert len(stems) == 7
    assert vio.variant_stem("atom", "away", 0.5, atoms=[469]) == "atom469-away-a0.5"
    assert vio.variant_stem("group", "toward", 1, group=3) == "group3-toward-a1"
    assert vio.variant_stem("supervised", "toward", 2, behaviour="bullets") == "supervised-bullets-toward-a2"
    assert vio.variant_stem("random", "toward", 2, atoms=[469]) == "random469-toward-a2"
    assert vio.variant_stem("composition", "toward", 2, atoms=[469, 299], weights=[1, 0.5]) == "comp469x1+299x0.5-toward-a2"
    assert vio.variant_stem("atom", "toward", 0.1, atoms=[1], units="relative", mode="linear") == "atom1-toward-a0.1rel-linear"
    assert vio.variant_stem("baseline") == "baseline"


def test_different_contents_never_share_a_name(tmp_path):
    vdir = tmp_path / "variants"
    a = vio.write_variant(vdir, "atom3-toward-a2", _tensors(0), CFG, _meta())
    t = _tensors(0)
    t["base_model.model.layer.lora_A.weight"][0, 0] += 1e-6  # one ulp-scale change
    b = vio.write_variant(vdir, "atom3-toward-a2", t, CFG, _meta())
    c = vio.write_variant(vdir, "atom3-toward-a2", _tensors(0), {**CFG, "lora_alpha": 16}, _meta())
    assert len({a["name"], b["name"], c["name"]}) == 3
    assert a["name"].startswith("atom3-toward-a2-") and len(a["name"].split("-")[-1]) == 8
    # the same content again: same name, the folder kept untouched
    mtime = os.stat(vdir / a["name"] / vio.ADAPTER_WEIGHTS).st_mtime_ns
    again = vio.write_variant(vdir, "atom3-toward-a2", _tensors(0), CFG, _meta())
    assert again["name"] == a["name"] and os.stat(vdir / a["name"] / vio.ADAPTER_WEIGHTS).st_mtime_ns == mtime
    rows = vio.list_variants(vdir)
    assert [r["name"] for r in rows] == sorted([a["name"], b["name"], c["name"]])
    assert rows[0]["path"].startswith("variants/")


def test_roundtrip_and_index(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    row = vio.write_variant(tmp_path / "variants", "atom3-toward-a2", _tensors(1), CFG, _meta(v_norm=1.5, delta_norm=3.0, rel_delta=0.1, behaviour="bullets"))
    base = vio.write_variant(tmp_path / "variants", "baseline", _tensors(2), CFG, {"kind": "baseline", "sign": "none", "alpha": 0.0, "rank": 4})
    tensors, cfg = vio.load_adapter_tensors(tmp_path / row["path"])
    assert cfg == CFG
    for k, v in _tensors(1).items():
        assert torch.equal(tensors[k], v)
    vio.write_index(tmp_path)
    idx = vio.read_index(tmp_path)
    assert [r["name"] for r in idx] == sorted([row["name"], base["name"]])
    by = {r["name"]: r for r in idx}
    assert by[row["name"]]["atoms"] == [3] and by[row["name"]]["behaviour"] == "bullets" and by[row["name"]]["v_norm"] == 1.5
    assert by[base["name"]]["group"] is None and by[base["name"]]["atoms"] == []
    assert tuple(vio.read_index(tmp_path / "variants")[0].keys()) == vio.INDEX_COLUMNS


def test_killed_write_leaves_no_listed_half_variant(tmp_path):
    vdir = tmp_path / "variants"
    vio.write_variant(vdir, "baseline", _tensors(0), CFG, {"kind": "baseline", "sign": "none", "alpha": 0.0})
    # a writer killed (SIGKILL, no cleanup) in the middle of writing its folder
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        from ga_ray.steer import io as vio
        def die(folder):  # called inside the temp folder's build, after the adapter files are written
            os.kill(os.getpid(), signal.SIGKILL)
        vio.write_variant({str(vdir)!r}, "atom1-toward-a1", {{"x.lora_A.weight": torch.ones(2, 2)}}, {{"r": 2}},
                          {{"kind": "atom", "atoms": [1], "sign": "toward", "alpha": 1.0}}, merge_fn=die)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], timeout=60, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    leftovers = [p.name for p in vdir.iterdir()]
    assert any(n.startswith(".atom1-toward-a1") for n in leftovers)  # the half-written temp folder is there...
    assert [r["name"] for r in vio.list_variants(vdir)] == [n for n in leftovers if n.startswith("baseline")]  # ...but never listed


def test_incomplete_folder_is_an_actionable_error(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(vio.DataError, match="variant.json"):
        vio.read_variant(tmp_path / "x")
    (tmp_path / "x" / "variant.json").write_text("{not json")
    with pytest.raises(vio.DataError, match="not valid JSON"):
        vio.read_variant(tmp_path / "x")
