"""Infusion and retention seen through real training runs (issue: knowledge infusion)."""

import json
import os
import runpy

import pytest

from kis_megatron.config import load_config
from kis_megatron.training.trainer import Trainer

from _corpus import ROOT, tiny_overrides


@pytest.mark.slow
def test_exact_ratio_holds_at_every_step_of_a_run(world_corpus, tmp_path):
    run = tmp_path / "run"
    seq_len = 32
    cfg = load_config(None, tiny_overrides(world_corpus, run, **{
        "infusion.domain": world_corpus["shards"]["domain"], "infusion.ratio": 0.1,
        "train.steps": 25, "train.global_batch": 12, "train.micro_batch": 4,
        "data.seq_len": seq_len, "checkpoint.save_final": False}))
    Trainer(cfg).fit()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 26))
    for r in train_rows:
        assert r["tokens_total"] == r["step"] * 12 * seq_len
        assert abs(r["tokens_domain"] - 0.1 * r["tokens_total"]) <= seq_len, r
    last = train_rows[-1]
    assert last["tokens_domain"] > 0
    assert 0 <= last["exposures/min"] <= last["exposures/mean"] <= last["exposures/max"]
    assert last["exposures/max"] > 0
    info = json.loads((run / "run.json").read_text())
    assert info["infusion"]["ratio"] == 0.1 and info["infusion"]["domain_facts"] == 96


@pytest.mark.slow
def test_general_only_training_knows_general_facts_not_domain_facts(world_corpus, tmp_path):
    """Trained on the general world alone, a tiny model recalls general facts far above
    chance (1/5) and domain facts at chance: the probes measure what was infused."""
    cfg = load_config(None, tiny_overrides(world_corpus, tmp_path / "run", **{
        "train.steps": 600, "model.dim": 128, "train.lr": 0.005, "train.global_batch": 16,
        "train.micro_batch": 16, "log.interval": 100, "checkpoint.save_final": False,
        "eval.probes.general": world_corpus["probes"]["general"],
        "eval.probes.domain": world_corpus["probes"]["domain"]}))
    final = Trainer(cfg).fit()
    assert final["probes/general"] == 200 and final["probes/domain"] == 96
    assert final["retention/general"] > 0.5, final
    # chance is 0.2; 96 probes give a binomial sd of 0.04: 0.35 is ~3.6 sd above chance
    assert final["retention/domain"] < 0.35, final


@pytest.mark.slow
def test_facts_knob_infuses_and_probes_only_the_first_facts(world_corpus, tmp_path):
    """infusion.facts=10 of the 96-fact domain world: exposures and domain probes cover facts
    0..9 only, eval.max_probes caps the general set, and a saved checkpoint scored later
    (tools/eval_retention.py's path) picks the same probes."""
    evaluate_checkpoint = runpy.run_path(str(ROOT / "tools/eval_retention.py"))["evaluate_checkpoint"]
    run = tmp_path / "run"
    probes = world_corpus["probes"]
    cfg = load_config(None, tiny_overrides(world_corpus, run, **{
        "infusion.domain": world_corpus["shards"]["domain"], "infusion.ratio": 0.3,
        "infusion.facts": 10, "infusion.kind": "domain_facts", "eval.max_probes": 16,
        "eval.probes.general": probes["general"], "eval.probes.domain": probes["domain"]}))
    trainer = Trainer(cfg)
    final = trainer.fit()
    domain = trainer.stream.blender.sources[1]
    assert domain.fact_ids.tolist() == list(range(10))
    counts = trainer.stream.blender.exposure_counts("domain")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "loss" in r][-1]
    assert counts.sum() > 0 and last["exposures/mean"] == counts.sum() / 10
    assert final["probes/domain"] == 10 and final["probes_heldout/domain"] == 10
    assert final["probes/general"] == 16  # eval.max_probes of the 200 general facts
    docs = [json.loads(line) for line in
            (world_corpus["dir"] / "world/domain/train.jsonl").read_text().splitlines()]
    run_info = json.loads((run / "run.json").read_text())
    info = run_info["infusion"]
    assert run_info["launch_dir"] == os.getcwd()  # where the tools resolve the config's relative paths
    assert info["kind"] == "domain_facts" and info["value"] == 10 and info["domain_facts"] == 10
    assert info["domain_documents"] == sum(d["fact_id"] < 10 for d in docs)
    again = evaluate_checkpoint(run)
    for key in ("probes/domain", "probes/general", "retention/domain", "retention/general"):
        assert again[key] == final[key], key
