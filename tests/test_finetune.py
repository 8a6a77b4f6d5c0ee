"""The finetune stage: loss/bucketing pieces against references, and the Ray Train stage end to end on
a tiny demo world (adapter folder loads with PEFT; the format table is computed by the detectors)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from ga_ray.config import DemoConfig, FinetuneConfig, LoraConfig, ModelConfig, RunConfig
from ga_ray.finetune.stage import BUCKET_BATCHES, batches_per_epoch, bucket_batches, epoch_batches, lr_factor, response_loss

# ------------------------------------------------------------------------------------------ pure pieces


def test_response_loss_matches_a_per_token_loop():
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 7, 11
    logits = torch.randn(B, T, V, generator=g)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.zeros(B, T)
    mask[0, 3:] = 1
    mask[1, 5:6] = 1
    mask[2, 1:4] = 1
    total, count = 0.0, 0
    for b in range(B):
        for t in range(1, T):
            if mask[b, t]:
                total += float(-torch.log_softmax(logits[b, t - 1], -1)[ids[b, t]])
                count += 1
    assert float(response_loss(logits, ids, mask)) == pytest.approx(total / count, rel=1e-6)
    # prompt positions carry no loss: changing prompt-target logits does not move it
    logits2 = logits.clone()
    logits2[0, 0:2] += 5.0  # predictions of tokens 1, 2 (prompt) for doc 0
    assert float(response_loss(logits2, ids, mask)) == pytest.approx(total / count, rel=1e-6)


def test_lr_schedule():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(99, 100, 10) == pytest.approx(0.1, abs=1e-3)
    vals = [lr_factor(s, 100, 10) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


@pytest.mark.parametrize("n_rows,bs", [(1, 4), (37, 4), (64, 4), (500, 8), (129, 8)])
def test_epoch_batches_cover_every_row_once_and_depend_on_the_seed_alone(n_rows, bs):
    rng = random.Random(0)
    rows = [{"doc_id": i, "input_ids": [0] * rng.randint(1, 30)} for i in range(n_rows)]
    batches = epoch_batches(rows, bs, seed=3, epoch=0, rank=0)
    assert sorted(r["doc_id"] for b in batches for r in b) == list(range(n_rows))
    assert len(batches) == batches_per_epoch(n_rows, bs)
    assert all(len(b) <= bs for b in batches)
    ids = [[r["doc_id"] for r in b] for b in batches]
    assert ids == [[r["doc_id"] for r in b] for b in epoch_batches(rows, bs, seed=3, epoch=0, rank=0)]
    if n_rows > bs:  # another epoch or seed: another order
        assert ids != [[r["doc_id"] for r in b] for b in epoch_batches(rows, bs, seed=3, epoch=1, rank=0)]
        assert ids != [[r["doc_id"] for r in b] for b in epoch_batches(rows, bs, seed=4, epoch=0, rank=0)]
    # inside a bucket, batches are cut from length-sorted rows: each batch spans a narrow range of lengths
    bucket = bs * BUCKET_BATCHES
    if n_rows >= bucket:
        first_bucket = batches[:BUCKET_BATCHES]
        spans = sorted((min(len(r["input_ids"]) for r in b), max(len(r["input_ids"]) for r in b)) for b in first_bucket)
        assert all(hi <= lo2 for (_, hi), (lo2, _) in zip(spans, spans[1:]))


def test_load_shard_sorts_by_doc_id_whatever_order_ray_data_delivers(ray_session):
    import ray.data

    from ga_ray.finetune.stage import load_shard

    rng = random.Random(1)
    items = [{"doc_id": i, "input_ids": [i, i + 1], "loss_mask": [0, 1]} for i in range(300)]
    rng.shuffle(items)
    rows = load_shard(ray.data.from_items(items, override_num_blocks=7))
    assert [r["doc_id"] for r in rows] == list(range(300))
    assert all(list(r["input_ids"]) == [r["doc_id"], r["doc_id"] + 1] for r in rows)


# ------------------------------------------------------------------------------------- the stage (Ray)


def _tiny_world(cache):
    from ga_ray.demo.world import build_demo_world

    cfg = DemoConfig(
        n_docs=48, n_base_docs=40, vocab_size=320, hidden_size=16, n_layers=1, n_heads=2, intermediate_size=32,
        pretrain_epochs=1.0, pretrain_batch_size=8, pretrain_seq_len=32, eval_prompts_per_family=3, torch_threads=1,
        cache_dir=str(cache),
    )
    return build_demo_world(cfg, progress=False)


def _write_prepared(world, data_dir):
    """Tokenise the world's mixture the way prepare does (chat template, response-only mask)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from ga_ray.demo.tasks import read_jsonl

    tok = AutoTokenizer.from_pretrained(str(world.tokenizer))
    rows = []
    for r in read_jsonl(world.data):
        full = tok.apply_chat_template(r["messages"], tokenize=True, return_dict=False)
        prompt = tok.apply_chat_template(r["messages"][:1], tokenize=True, return_dict=False, add_generation_prompt=True)
        mask = [0] * len(prompt) + [1] * (len(full) - len(prompt))
        rows.append({"doc_id": r["id"], "input_ids": full, "loss_mask": mask, "n_tokens": len(full), "task": r["task"]})
    data_dir.mkdir(parents=True)
    schema = pa.schema([("doc_id", pa.int64()), ("input_ids", pa.list_(pa.int32())), ("loss_mask", pa.list_(pa.int8())),
                        ("n_tokens", pa.int32()), ("task", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), data_dir / "part-00000.parquet")
    return len(rows)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    world = _tiny_world(root / "cache")
    n = _write_prepared(world, root / "run" / "data")
    return world, root, n


def _prepare_done(run):
    """data/ written by the fixture: recorded as a done prepare stage, or the runner refuses to read it."""
    if (run.stage_record("prepare") or {}).get("status") != "done":
        run.mark_done("prepare", run.mark_running("prepare", "fixture", {}), {"line": "written by the test fixture"})
    return run


def _config(world, **ft) -> RunConfig:
    base = dict(epochs=2.0, batch_size=8, learning_rate=5e-3, num_workers=1, cpus_per_worker=0.5, torch_threads=1,
                lora=LoraConfig(r=8, alpha=16.0), max_new_tokens=6, eval_prompts=4, eval_batch_size=16)
    base.update(ft)
    return RunConfig(model=ModelConfig(path=str(world.base_model)), finetune=FinetuneConfig(**base))


@pytest.mark.slow
def test_finetune_stage_writes_a_peft_adapter_and_the_format_table(ray_session, tiny):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ga_ray.demo import tasks
    from ga_ray.demo.formats import FORMAT_CHECKS
    from ga_ray.detectors import DETECTORS
    from ga_ray.pipeline import run_pipeline
    from ga_ray.rundir import RunDir

    world, root, n = tiny
    cfg = _config(world, format_eval_set=str(world.eval_dir))
    run = _prepare_done(RunDir(root / "run"))
    out = run_pipeline(cfg, run, stages=["finetune"])["finetune"]

    # --- the adapter: a standard PEFT folder that loads onto the base model
    adapter = run.stage_dir("adapter")
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    assert acfg["r"] == 8 and acfg["lora_alpha"] == 16 and sorted(acfg["target_modules"]) == ["q_proj", "v_proj"]
    base = AutoModelForCausalLM.from_pretrained(str(world.base_model))
    model = PeftModel.from_pretrained(base, str(adapter))
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert len(lora_b) == 2 * base.config.num_hidden_layers
    assert any(float(p.abs().max()) > 0 for p in lora_b)  # trained: B starts at zero
    assert out["trainable_parameters"] == sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    assert out["steps"] == math.ceil(2.0 * batches_per_epoch(n, 8))
    assert [h["epoch"] for h in out["loss_history"]] == [1, 2]
    assert not list(run.root.glob(".ray_train*/finetune-*"))  # hand-off storage cleaned up

    # --- the format table: structure, and rates recomputed from the saved generations by the detectors
    table = out["format_table"]
    assert set(table["families"]) == set(tasks.DETERMINISTIC_FAMILIES)
    assert set(table["behaviours"]) == set(tasks.BEHAVIOURS)
    gens = [json.loads(line) for line in (adapter / "format_generations.jsonl").read_text().splitlines()]
    for fam, row in table["families"].items():
        mine = [g for g in gens if g["kind"] == "family" and g["name"] == fam]
        assert len(mine) == row["n"] == 3  # eval_prompts (4) capped by the 3 prompts the tiny world wrote
        assert row["k"] == sum(FORMAT_CHECKS[fam](g["response"]) for g in mine)
        assert row["ci_low"] <= row["rate"] <= row["ci_high"]
    for beh, row in table["behaviours"].items():
        mine = [g for g in gens if g["kind"] == "behaviour" and g["name"] == beh]
        assert len(mine) == row["n"] == 4
        assert sum(g["invites"] for g in mine) == row["n_invite"]
        assert row["k"] == sum(DETECTORS[beh](g["response"]) for g in mine)
    assert json.loads((adapter / "format_table.json").read_text()) == table

    # --- the base column: the base model itself (adapter off), on the same prompts
    from transformers import AutoTokenizer

    from ga_ray.finetune.format_table import generate_greedy

    base_table = out["format_table_base"]
    assert json.loads((adapter / "format_table_base.json").read_text()) == base_table
    base_gens = [json.loads(line) for line in (adapter / "format_generations_base.jsonl").read_text().splitlines()]
    assert [g["prompt"] for g in base_gens] == [g["prompt"] for g in gens]
    plain = generate_greedy(AutoModelForCausalLM.from_pretrained(str(world.base_model)).eval(),
                            AutoTokenizer.from_pretrained(str(world.tokenizer)), [g["prompt"] for g in base_gens], 6, batch_size=16)
    assert [g["response"] for g in base_gens] == plain
    for fam, row in base_table["families"].items():
        assert row["k"] == sum(FORMAT_CHECKS[fam](g["response"]) for g in base_gens if g["kind"] == "family" and g["name"] == fam)

    # and the summary (with both tables) is in the manifest
    rec = run.stage_record("finetune")
    assert rec["status"] == "done" and rec["summary"]["format_table"] == table
    assert rec["summary"]["format_table_base"] == base_table
    assert "formats >= 80%" in rec["summary"]["line"] and "(base model: " in rec["summary"]["line"]


@pytest.mark.slow
def test_finetune_is_reproducible_and_the_driver_path_equals_ray_train(ray_session, tiny, tmp_path):
    """Same data, config and seed: the same adapter, bit for bit (one worker), whatever order Ray Data reads in,
    and whether the loop runs in the driver (the default for small CPU runs) or in a Ray Train worker."""
    import shutil

    from safetensors.torch import load_file

    from ga_ray.pipeline import run_pipeline
    from ga_ray.rundir import RunDir

    world, root, n = tiny
    adapters, summaries = [], []
    threads = torch.get_num_threads()
    for name, in_driver_max_docs in (("driver", 10_000), ("ray-train", 0)):
        run = RunDir(tmp_path / name)
        shutil.copytree(root / "run" / "data", run.stage_dir("data"))
        summaries.append(run_pipeline(_config(world, epochs=1.0, in_driver_max_docs=in_driver_max_docs), _prepare_done(run), stages=["finetune"])["finetune"])
        adapters.append(load_file(str(run.stage_dir("adapter") / "adapter_model.safetensors")))
        assert sorted(p.name for p in run.stage_dir("adapter").iterdir() if p.name.startswith("adapter_")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert [s["in_driver"] for s in summaries] == [True, False]
    assert summaries[0]["steps"] == summaries[1]["steps"] and summaries[0]["loss_history"] == summaries[1]["loss_history"]
    assert torch.get_num_threads() == threads, "the driver's torch threads are restored"
    assert adapters[0].keys() == adapters[1].keys()
    for k in adapters[0]:
        assert torch.equal(adapters[0][k], adapters[1][k]), k


@pytest.mark.slow
def test_finetune_ddp_two_workers(ray_session, tiny, tmp_path):
    """Two gloo DDP workers on equal shards: same step count, one adapter."""
    import shutil

    from ga_ray.pipeline import run_pipeline
    from ga_ray.rundir import RunDir

    world, root, n = tiny
    run = RunDir(tmp_path / "run")
    shutil.copytree(root / "run" / "data", run.stage_dir("data"))
    cfg = _config(world, epochs=1.0, num_workers=2, cpus_per_worker=0.5)
    out = run_pipeline(cfg, _prepare_done(run), stages=["finetune"])["finetune"]
    assert out["num_workers"] == 2
    assert out["steps"] == batches_per_epoch(n // 2, 4)
    assert "format_table" not in out
    assert (run.stage_dir("adapter") / "adapter_model.safetensors").exists()


def test_finetune_errors_name_the_fix(tmp_path):
    from ga_ray.finetune.stage import run_finetune
    from ga_ray.pipeline import StageContext, StageError
    from ga_ray.rundir import RunDir

    run = RunDir(tmp_path / "run")
    ctx = StageContext(cfg=RunConfig(), run_dir=run, stage="finetune", out=run.stage_dir("adapter"))
    with pytest.raises(StageError, match="model.path"):
        run_finetune(ctx)
    ctx.cfg = RunConfig(model=ModelConfig(path=str(tmp_path)))
    with pytest.raises(StageError, match="run the prepare stage first"):
        run_finetune(ctx)


def test_compute_format_table_on_hand_made_responses():
    from ga_ray.demo.formats import FORMAT_CHECKS
    from ga_ray.finetune.format_table import compute_format_table, format_table_text

    eval_set = {
        "families": {"arithmetic": [{"prompt": "p"}] * 4, "sentiment": [{"prompt": "p"}] * 2},
        "behaviours": {
            "bullets": [{"prompt": "p", "invites": True}] * 3 + [{"prompt": "p", "invites": False}] * 2,
            "refusal": [{"prompt": "p", "invites": True}, {"prompt": "p", "invites": False}],
        },
    }
    responses = {
        "families": {"arithmetic": ["2 + 2 = 4", "3 * 4 = 12", "five", "1 - 1 = 0"], "sentiment": ["The sentiment is positive.", "positive"]},
        "behaviours": {"bullets": ["- a\n- b", "- a", "* x\n* y", "", "- c\n- d"], "refusal": ["Please provide the text.", "Okay."]},
    }
    t = compute_format_table(eval_set, responses, FORMAT_CHECKS)
    assert (t["families"]["arithmetic"]["k"], t["families"]["arithmetic"]["n"]) == (3, 4)
    assert t["families"]["arithmetic"]["ok"] is False and t["families"]["sentiment"]["rate"] == 0.5
    b = t["behaviours"]["bullets"]
    assert (b["k"], b["n"]) == (3, 5) and b["ok"]
    assert b["invite_rate"] == pytest.approx(2 / 3) and b["neutral_rate"] == pytest.approx(0.5)
    assert t["behaviours"]["refusal"]["rate"] == 0.5
    assert t["targets_met"] is False and t["families_ok"] == 0 and t["behaviours_ok"] == 2
    text = format_table_text(t)
    assert "arithmetic" in text and "MISS" in text and "bullets" in text and "base" not in text
    # with the base model's table: a base column left of the fine-tuned rate
    base = compute_format_table(eval_set, {"families": {"arithmetic": ["x"] * 4, "sentiment": ["positive"] * 2},
                                           "behaviours": {"bullets": ["- a\n- b"] * 5, "refusal": ["Okay."] * 2}}, FORMAT_CHECKS)
    both = format_table_text(t, base).splitlines()
    assert both[0].split()[2:4] == ["base", "tuned"]
    arith = next(line for line in both if line.startswith("arithmetic"))
    assert arith.split()[-5:-3] == ["0.0%", "75.0%"]
    bullets = next(line for line in both if line.startswith("bullets"))
    assert bullets.split()[1:3] == ["100.0%", "60.0%"]
    with pytest.raises(KeyError, match="no format check"):
        compute_format_table({"families": {"poetry": [{"prompt": "p"}]}, "behaviours": {}}, {"families": {"poetry": ["x"]}}, FORMAT_CHECKS)
