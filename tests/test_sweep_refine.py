"""Value axes, refinement and validation planning of sweeps.  Planning is tested against fake
finished runs (run.json and metrics.jsonl written by hand with a known retention curve), so
nothing trains except the one end-to-end test at the end."""

import json
import math
import runpy

import numpy as np
import pytest
import torch
import yaml

from _corpus import ROOT, write_base_config
from kis_megatron.config import ConfigError, load_config
from kis_megatron.model.llama import Transformer
from kis_megatron.sweep import load_sweep, run_status
from kis_megatron.sweep.refine import plan_refinement, refine_local
from kis_megatron.sweep.validate import PLAN_FILE, validation_levels, validation_sweep

main = runpy.run_path(str(ROOT / "tools/sweep.py"), run_name="tool")["main"]  # the sweep CLI

BASE = {
    "model": {"preset": "tiny", "vocab_size": 64, "dim": 16, "n_layers": 1, "n_heads": 2, "max_seq_len": 16},
    "data": {"train": "unused", "seq_len": 16},
    "train": {"steps": 10, "global_batch": 4, "micro_batch": 4},
}
MODELS = [{"name": "d16", "overrides": {"model.dim": 16}}, {"name": "d32", "overrides": {"model.dim": 32}}]
FACTS = {"values": [32, 64, 128, 256, 512, 1024, 2048], "name": "f{value:04d}", "integer": True,
         "overrides": {"infusion.kind": "custom", "infusion.value": "{value}"}}
SEEDS = {"values": [0, 1], "name": "s{value}", "overrides": {"train.seed": "{value}"}}
REFINE = {"axis": "infusion", "metric": "retention/domain", "chance": 0.2, "target_width": 0.15, "max_runs": 8}
N_BOOT = 200  # the planning logic does not depend on the replicate count; keeps the tests fast


def write_sweep(tmp_path, axes, **sections):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    doc = {"base": "base.yaml", "out": str(tmp_path / "runs"), "axes": axes, **sections}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def step_retention(cp, plateau=0.9, floor=0.2):
    """A fall sharper than any level spacing: plateau below cp, floor from cp on."""
    return lambda x: plateau if x < cp else floor


def finish(runs, retention, chance=0.2):
    """Write the logs of finished runs: run.json and a final evaluation of ``retention(x)``."""
    for run in runs:
        if run_status(run) == "finished":
            continue
        run.run_dir.mkdir(parents=True, exist_ok=True)
        (run.run_dir / "run.json").write_text(json.dumps({
            "run_id": run.run_id, "model_params": run.params, "tokens_per_step": run.tokens,
            "total_steps": 1, "infusion": {"kind": "domain_facts", "value": run.infusion},
            "status": "finished"}))
        value = retention(run.infusion)
        (run.run_dir / "metrics.jsonl").write_text(
            json.dumps({"step": 1, "loss": 3.0, "tokens_total": run.tokens}) + "\n"
            + json.dumps({"step": 1, "retention/domain": value, "retention_chance/domain": chance}) + "\n")


def records(path):
    return json.loads((path.parent / "runs" / "refine.json").read_text())["added"]


# ---------------------------------------------------------------------------- value axes


def test_value_axis_ids_typed_overrides_and_seeds(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, {
        "model": MODELS[:1],
        "infusion": {"values": [32, 181.4], "name": "f{value:04d}", "integer": True,
                     "overrides": {"infusion.kind": "custom", "infusion.value": "{value}",
                                   "infusion.domain": "data/f{value}/shard", "infusion.ratio": 0.3}},
        "seed": SEEDS}))
    assert [r.run_id for r in sweep.runs] == ["d16-f0032-s0", "d16-f0032-s1", "d16-f0181-s0", "d16-f0181-s1"]
    run = sweep.runs[3]
    assert run.overrides == {"model.dim": 16, "infusion.kind": "custom", "infusion.value": 181, "infusion.domain": "data/f181/shard",
                             "infusion.ratio": 0.3, "train.seed": 1}
    assert type(run.overrides["infusion.value"]) is int and run.points["infusion"].value == 181
    cfg = load_config(sweep.base, run.override_args())
    assert (cfg.infusion.value, cfg.infusion.domain, cfg.train.seed) == (181, "data/f181/shard", 1)
    assert run.infusion == 181.0 and run.tokens == 4 * 16 * 10
    ratio = load_sweep(write_sweep(tmp_path, {"r": {"values": [0.05, 0.1],
                                                    "overrides": {"infusion.ratio": "{value}"}}}))
    assert [r.run_id for r in ratio.runs] == ["r0.05", "r0.1"]  # default name: <axis>{value}
    assert ratio.runs[0].overrides == {"infusion.ratio": 0.05} and ratio.axes["r"].point(0.3).name == "r0.3"


@pytest.mark.parametrize("axis, needle", [
    ({"values": []}, "a value axis needs a non-empty list 'values'"),
    ({"overrides": {}}, "a value axis needs a non-empty list 'values'"),
    ({"values": [1, "x"]}, "values must be finite numbers, got 'x'"),
    ({"values": [1.2, 1.4], "name": "f{value:.0f}"}, "values 1.2 and 1.4 both give the point name 'f1'"),
    ({"values": [1, 1.2], "name": "f{value}", "integer": True}, "both give the point name 'f1'"),
    ({"values": [1], "name": "f{val}"}, "name template 'f{val}' cannot format value 1: KeyError"),
    ({"values": [1.5], "name": "f{value:04d}"}, "needs integer: true"),
    ({"values": [1], "overrides": {"infusion.domain": "d/{value"}}, "override infusion.domain template"),
    ({"values": [1], "nme": "x"}, r"unknown keys \['nme'\]"),
    ({"values": [1], "name": "fixed"}, "'name' must be a template string with {value}"),
    ({"values": [1], "integer": "yes"}, "'integer' must be true or false"),
])
def test_bad_value_axes_name_file_and_axis(tmp_path, axis, needle):
    with pytest.raises(ConfigError, match=r"sweep\.yaml: axis 'infusion'.*" + needle):
        load_sweep(write_sweep(tmp_path, {"model": MODELS[:1], "infusion": axis}))


def test_bad_refine_sections(tmp_path):
    axes = {"model": MODELS[:1], "infusion": FACTS}
    for refine, needle in [({**REFINE, "axis": "model"}, "'axis' must name a value axis"),
                           ({**REFINE, "max_runs": -1}, "'max_runs' must be an integer >= 0"),
                           ({**REFINE, "limits": [5, 1]}, "'limits' must satisfy"),
                           ({**REFINE, "seed_axis": "infusion"}, "'seed_axis' must name another axis"),
                           ({**REFINE, "targt_width": 1}, "unknown keys"),
                           ({**REFINE, "chance": "guess"}, "'chance' must be a number")]:
        with pytest.raises(ConfigError, match="sweep.yaml: refine: " + needle):
            load_sweep(write_sweep(tmp_path, axes, refine=refine))
    # Refinement measures levels in the units run.json logs: an axis that does not set them is refused.
    with pytest.raises(ConfigError, match="logs the infusion value 0 .*infusion.kind=ratio.*make the axis"):
        load_sweep(write_sweep(tmp_path, {"model": MODELS[:1], "infusion": {**FACTS, "overrides": {}}},
                               refine=REFINE))


# ---------------------------------------------------------------------------- refinement


def test_sharp_fall_is_split_at_the_geometric_midpoint_round_by_round(tmp_path):
    path = write_sweep(tmp_path, {"model": MODELS[:1], "infusion": FACTS}, refine=REFINE)
    truth = step_retention(300)  # falls between the levels 256 and 512
    finish(load_sweep(path).runs, truth)
    lines = []
    step = plan_refinement(load_sweep(path), n_boot=N_BOOT, log=lines.append)
    assert [r.run_id for r in step.new_runs] == ["d16-f0362"]  # round(sqrt(256 * 512))
    assert step.new_runs[0].overrides["infusion.value"] == 362
    (entry,) = records(path)
    assert entry["round"] == 1 and entry["curve"] == "d16" and entry["points"] == {"model": "d16"}
    assert entry["value"] == 362 and entry["runs"] == ["d16-f0362"]
    assert entry["ci"] == pytest.approx([256, 512]) and entry["ci_width"] == pytest.approx(math.log10(2))
    (line,) = lines
    assert line.startswith("refine round 1: d16: collapse ")
    assert line.endswith(" [256, 512], CI 0.301 decades -> new level 362 (d16-f0362)")

    # A rerun re-adds the recorded level; until it finishes, the curve waits (nothing new).
    sweep = load_sweep(path)
    assert [(r.run_id, r.origin, run_status(r)) for r in sweep.runs[-1:]] == [("d16-f0362", "refine round 1", "new")]
    assert not plan_refinement(sweep, n_boot=N_BOOT, log=lines.append).new_runs
    assert "waiting for 1 unfinished run(s): d16-f0362 (new)" in lines[-1] and len(records(path)) == 1

    # Finished, it continues: 362 fell, so the fall is in (256, 362) -> 304; then the CI
    # log10(304 / 256) = 0.0746 decades is narrower than 0.15: done.
    finish(sweep.runs, truth)
    step = plan_refinement(load_sweep(path), n_boot=N_BOOT, log=lines.append)
    assert [r.run_id for r in step.new_runs] == ["d16-f0304"] and step.round == 2
    finish(load_sweep(path).runs, truth)
    step = plan_refinement(load_sweep(path), n_boot=N_BOOT, log=lines.append)
    assert not step.new_runs and step.curves[0].status == "done"
    assert lines[-1].endswith("[256, 304], CI 0.0746 decades; <= 0.15: done")
    assert [(e["round"], e["value"]) for e in records(path)] == [(1, 362), (2, 304)]


def test_flat_curves_extend_up_within_max_runs_and_limits_for_every_seed(tmp_path):
    facts = {**FACTS, "values": [32, 64, 128, 256]}
    path = write_sweep(tmp_path, {"model": MODELS, "infusion": facts, "seed": SEEDS},
                       refine={**REFINE, "seed_axis": "seed", "max_runs": 3, "limits": [1, 300]})
    finish(load_sweep(path).runs, lambda x: 0.9)  # no collapse in range
    lines = []
    step = plan_refinement(load_sweep(path), n_boot=N_BOOT, log=lines.append)
    # 2 x 256 is beyond the limit 300: the level is the limit, one run per seed.  The second
    # curve's level (2 runs) no longer fits into max_runs = 3.
    assert [r.run_id for r in step.new_runs] == ["d16-f0300-s0", "d16-f0300-s1"]
    assert [c.status for c in step.curves] == ["added", "budget"]
    assert lines[0] == "refine round 1: d16: no collapse located up to 256 (no CI) -> new level 300 " \
                       "(d16-f0300-s0, d16-f0300-s1)"
    assert lines[1].endswith("level 300 not added: max_runs (3) spent")
    finish(load_sweep(path).runs, lambda x: 0.9)
    step = plan_refinement(load_sweep(path), n_boot=N_BOOT, log=lines.append)
    assert not step.new_runs and [c.status for c in step.curves] == ["done", "budget"]
    assert len(records(path)) == 1


def test_a_level_whose_config_is_invalid_stops_that_curve_only(tmp_path):
    ratio = {"values": [0.05, 0.1, 0.2, 0.4, 0.8], "name": "r{value:g}", "overrides": {"infusion.ratio": "{value}"}}
    path = write_sweep(tmp_path, {"model": MODELS, "infusion": ratio}, refine=REFINE)
    runs = load_sweep(path).runs
    finish([r for r in runs if r.run_id.startswith("d16")], lambda x: 0.9)  # no collapse: extend to 1.6
    finish([r for r in runs if r.run_id.startswith("d32")], step_retention(0.3))
    lines = []
    step = plan_refinement(load_sweep(path), n_boot=N_BOOT, log=lines.append)
    # d16's next level, 1.6, is not a ratio: reported, and d16 is not refined; d32 goes on.
    assert [c.status for c in step.curves] == ["stopped", "added"]
    assert "d16: no collapse located up to 0.8 (no CI); level 1.6 cannot be run, curve not refined " \
           "further" in lines[0] and "infusion.ratio" in lines[0]
    assert [r.run_id for r in step.new_runs] == [f"d32-r{step.curves[1].level:g}"]
    assert [e["curve"] for e in records(path)] == ["d32"]


def test_planning_is_deterministic(tmp_path):
    def plan(d):
        d.mkdir()
        path = write_sweep(d, {"model": MODELS, "infusion": {**FACTS, "values": [32, 64, 128, 256, 512]}},
                           refine={**REFINE, "chance": "auto", "target_width": 0.05})
        rng = np.random.default_rng(1)  # the same noisy results in both directories
        noisy = lambda x: float(np.clip(0.2 + 0.7 / (1 + (x / 150) ** 3) + rng.normal(0, 0.03), 0, 1))  # noqa: E731
        finish(load_sweep(path).runs, noisy)
        plan_refinement(load_sweep(path), n_boot=N_BOOT, log=lambda s: None)
        return [{k: v for k, v in e.items()} for e in records(path)]

    first, second = plan(tmp_path / "a"), plan(tmp_path / "b")
    assert first == second and len(first) == 2


def test_refine_print_launch_plans_one_round_and_list_shows_it(tmp_path, capsys):
    path = write_sweep(tmp_path, {"model": MODELS[:1], "infusion": FACTS}, refine=REFINE)
    assert main([str(path), "--refine", "--print-launch", "slurm"]) == 0
    out = capsys.readouterr().out
    assert "sbatch --array=0-6 " in out  # nothing finished yet: the grid, no round
    finish(load_sweep(path).runs, step_retention(300))
    assert main([str(path), "--refine", "--print-launch", "slurm"]) == 0
    out, err = capsys.readouterr()
    assert "sbatch --array=0-0 " in out and "infusion.value=362" in out and "log.dir=" in out
    assert "refine round 1: d16:" in err
    assert main([str(path), "--refine", "--print-launch", "torchrun"]) == 0  # not finished: same run
    assert "infusion.value=362" in capsys.readouterr().out and len(records(path)) == 1
    assert main([str(path), "--list"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("d16-f0362") and last.endswith("new  (refine round 1)")
    assert main([str(path), "--refine", "--validate", "law.json"]) == 2
    assert "needs a validate: section" in capsys.readouterr().err


# ---------------------------------------------------------------------------- validation

VALUE = {"values": [1.0, 2.0, 4.0, 8.0], "name": "v{value:.4g}",
         "overrides": {"infusion.kind": "custom", "infusion.value": "{value}"}}
VALIDATE = {"model": {"name": "d48", "overrides": {"model.dim": 48, "train.steps": 20}}, "levels": 5, "spacing": 0.2}


def write_law(path, coefficient=0.05, exponent=0.25, tokens_exponent=None):
    path.write_text(json.dumps({"coefficient": coefficient, "exponent": exponent,
                                "tokens_exponent": tokens_exponent,
                                "form": "CP = a * N^b" + (" * D^c" if tokens_exponent is not None else "")}))
    return path


def held_out_size():
    """N and D of the validation model, built for real (not on the meta device)."""
    cfg = load_config(None, [f"{s}.{k}={v}" for s, sec in BASE.items() for k, v in sec.items()]
                      + ["model.dim=48", "train.steps=20"])
    torch.manual_seed(0)
    return Transformer(cfg.model).num_params(), 4 * 16 * 20


@pytest.mark.parametrize("tokens_exponent", [None, -0.1])
def test_validation_levels_centre_on_the_prediction(tmp_path, tokens_exponent):
    path = write_sweep(tmp_path, {"model": MODELS, "infusion": VALUE, "seed": SEEDS},
                       refine={**REFINE, "seed_axis": "seed"}, validate=VALIDATE)
    law = write_law(tmp_path / "law.json", tokens_exponent=tokens_exponent)
    lines = []
    vsweep = validation_sweep(load_sweep(path), law, log=lines.append)
    n, d = held_out_size()
    cp = 0.05 * n**0.25 * (d**tokens_exponent if tokens_exponent is not None else 1)
    j = round(math.log10(cp) / 0.2)  # the grid point nearest the prediction is the middle one
    levels = [10 ** (0.2 * (j + k)) for k in (-2, -1, 0, 1, 2)]
    plan = json.loads((tmp_path / "runs_validate" / PLAN_FILE).read_text())
    assert plan["law"] == str(law.resolve()) and len(plan["law_sha256"]) == 64
    assert plan["tokens_exponent"] == tokens_exponent and plan["model"]["name"] == "d48"
    (curve,) = plan["curves"]
    assert (curve["curve"], curve["model_params"], curve["tokens"]) == ("d48", n, d)
    assert curve["predicted"] == pytest.approx(cp, rel=1e-12)
    assert curve["levels"] == pytest.approx(levels, rel=1e-12)
    # Every level for every seed, in the validation out dir, apart from the ladder's runs.
    assert [r.run_id for r in vsweep.runs] == [f"d48-v{v:.4g}-s{s}" for v in levels for s in (0, 1)]
    assert all(r.run_dir.parent == tmp_path / "runs_validate" and r.params == n for r in vsweep.runs)
    assert vsweep.runs[0].overrides["infusion.value"] == pytest.approx(levels[0], rel=1e-12)
    assert lines == [f"validate: d48: N={n:.4g}, D={d:.4g}: predicted collapse {cp:.4g}; levels "
                     + ", ".join(f"{v:g}" for v in levels)]


def test_validation_levels_rounded_clipped_and_unique():
    # grid 10^(0.1 j): 2 2.51 3.16 3.98 5.01 around 3.0 (j = 5 nearest), rounded and unique
    assert validation_levels(3.0, 5, 0.1, integer=True) == [2, 3, 4, 5]
    # an even count: the block of grid points whose centre is nearest (a tie takes the upper)
    assert validation_levels(100.0, 4, 0.5) == pytest.approx([10**1.5, 10**2, 10**2.5, 10**3])
    assert validation_levels(90.0, 4, 0.5) == pytest.approx([10**1, 10**1.5, 10**2, 10**2.5])  # centre 56
    assert validation_levels(100.0, 3, 1.0, limits=(20.0, 500.0)) == [20.0, 100.0, 500.0]
    assert validation_levels(0.2, 3, 0.5, integer=True) == [1]  # 0.1 and 0.32 round to 0: dropped


def test_validation_levels_do_not_move_with_the_last_digits_of_the_prediction():
    # the levels lie on a fixed grid, so a refit that moves the prediction by a few percent
    # (another machine's last bits, a refit with its validation) runs the same levels
    base = validation_levels(877.3, 4, 0.2, integer=True)
    assert base == [398, 631, 1000, 1585]
    for cp in (850.0, 877.3 * 1.02, 900.0):
        assert validation_levels(cp, 4, 0.2, integer=True) == base


def test_a_changed_law_is_refused_unless_forced_and_runs_are_kept(tmp_path, capsys):
    path = write_sweep(tmp_path, {"model": MODELS, "infusion": VALUE}, refine=REFINE,
                       validate={**VALIDATE, "out": str(tmp_path / "val")})
    law = write_law(tmp_path / "law.json")
    first = validation_sweep(load_sweep(path), law, log=lambda s: None)
    finish(first.runs[:1], lambda x: 0.9)
    again = validation_sweep(load_sweep(path), law, log=lambda s: None)  # same law: resumes
    assert [r.run_id for r in again.runs] == [r.run_id for r in first.runs]
    assert run_status(again.runs[0]) == "finished"
    write_law(law, coefficient=0.1)
    with pytest.raises(ConfigError, match="planned from another law .*pass --force-new-plan"):
        validation_sweep(load_sweep(path), law, log=lambda s: None)
    assert main([str(path), "--validate", str(law), "--print-launch", "slurm"]) == 2
    assert "--force-new-plan" in capsys.readouterr().err
    old_sha = json.loads((tmp_path / "val" / PLAN_FILE).read_text())["law_sha256"]
    (tmp_path / "val" / "refine.json").write_text(json.dumps({"axis": "infusion", "added": []}))
    assert main([str(path), "--validate", str(law), "--force-new-plan", "--print-launch", "torchrun"]) == 0
    out = capsys.readouterr().out
    assert "model.dim=48" in out and "infusion.value=" in out and f"log.dir={tmp_path / 'val'}/d48-v" in out
    assert (tmp_path / "val" / f"validation_plan.{old_sha[:12]}.json").is_file()
    assert (tmp_path / "val" / f"refine.{old_sha[:12]}.json").is_file()  # set aside with the old plan
    assert not (tmp_path / "val" / "refine.json").exists()
    assert run_status(first.runs[0]) == "finished"  # the old plan's finished run is still there
    plan = json.loads((tmp_path / "val" / PLAN_FILE).read_text())
    assert plan["coefficient"] == 0.1 and plan["law_sha256"] != old_sha


def test_validation_needs_a_section_and_a_law(tmp_path):
    path = write_sweep(tmp_path, {"model": MODELS, "infusion": VALUE}, refine=REFINE)
    with pytest.raises(ConfigError, match="needs a validate: section"):
        validation_sweep(load_sweep(path), tmp_path / "law.json")
    path = write_sweep(tmp_path, {"model": MODELS, "infusion": VALUE}, refine=REFINE, validate=VALIDATE)
    with pytest.raises(ConfigError, match="law file not found"):
        validation_sweep(load_sweep(path), tmp_path / "law.json")
    (tmp_path / "law.json").write_text(json.dumps({"exponent": 0.3}))
    with pytest.raises(ConfigError, match="is not a law.json written by tools/fit_law.py"):
        validation_sweep(load_sweep(path), tmp_path / "law.json")
    for validate, needle in [({**VALIDATE, "model_axis": "size"}, "'model_axis' 'size' is not an axis"),
                             ({**VALIDATE, "out": str(tmp_path / "runs" / "v")},
                              "'out' .* must be a directory apart from the ladder's out"),
                             ({**VALIDATE, "levels": 0}, "'levels' must be an integer >= 1"),
                             ({**VALIDATE, "refine_runs": -1}, "'refine_runs' must be an integer >= 0"),
                             ({**VALIDATE, "model": {"name": "x", "overides": {}}}, "'model' is one point")]:
        with pytest.raises(ConfigError, match="sweep.yaml: validate: " + needle):
            load_sweep(write_sweep(tmp_path, {"model": MODELS, "infusion": VALUE}, refine=REFINE,
                                   validate=validate))


def test_validation_curve_is_refined_and_resumed(tmp_path):
    path = write_sweep(tmp_path, {"model": MODELS, "infusion": VALUE, "seed": SEEDS},
                       refine={**REFINE, "seed_axis": "seed"}, validate=VALIDATE)
    law = write_law(tmp_path / "law.json")
    vsweep = validation_sweep(load_sweep(path), law, log=lambda s: None)
    top = max(r.infusion for r in vsweep.runs)
    finish(vsweep.runs, lambda x: 0.9)  # the collapse lies above the generated levels: extend
    step = plan_refinement(vsweep, n_boot=N_BOOT, log=lambda s: None)
    assert [r.run_id for r in step.new_runs] == [f"d48-v{2 * top:.4g}-s0", f"d48-v{2 * top:.4g}-s1"]
    assert (tmp_path / "runs_validate" / "refine.json").is_file() and not (tmp_path / "runs" / "refine.json").exists()
    again = validation_sweep(load_sweep(path), law, log=lambda s: None)
    assert [r.run_id for r in again.runs[-2:]] == [r.run_id for r in step.new_runs]
    assert len(load_sweep(path).runs) == 2 * 4 * 2  # the ladder is untouched
    capped = write_sweep(tmp_path, {"model": MODELS, "infusion": VALUE, "seed": SEEDS},
                         refine={**REFINE, "seed_axis": "seed"}, validate={**VALIDATE, "refine_runs": 0})
    assert validation_sweep(load_sweep(capped), law, log=lambda s: None).refine.max_runs == 0
    assert load_sweep(capped).refine.max_runs == REFINE.get("max_runs", 8)  # the ladder keeps its own


# ---------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_refine_trains_the_grid_then_the_refined_level_and_resumes(world_corpus, tmp_path):
    """Tiny runs (3 steps) on the test corpus: the grid, one refined level (max_runs 1), then a
    rerun that trains nothing."""
    write_base_config(world_corpus, tmp_path / "base.yaml", **{
            "train.steps": 3, "infusion.domain": world_corpus["shards"]["domain"],
            "eval.probes": "{domain: %s}" % world_corpus["probes"]["domain"]})
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "base": "base.yaml", "out": str(tmp_path / "runs"),
        "axes": {"model": [{"name": "d16", "overrides": {"model.dim": 16}}],
                 "infusion": {"values": [0.05, 0.1, 0.2, 0.4], "name": "r{value:g}",
                              "overrides": {"infusion.ratio": "{value}"}}},
        "refine": {"axis": "infusion", "metric": "retention/domain", "chance": "auto", "max_runs": 1}},
        sort_keys=False))
    lines = []
    outcome = refine_local(load_sweep(path), jobs=2, progress=False, log=lines.append)
    assert len(outcome) == 5 and all(v.startswith("finished") for v in outcome.values()), outcome
    (entry,) = records(path)
    assert outcome.keys() - {f"d16-r{v:g}" for v in (0.05, 0.1, 0.2, 0.4)} == {entry["runs"][0]}
    assert sum(line.startswith("refine round") for line in lines) == 2  # round 2: max_runs spent
    again = []
    outcome = refine_local(load_sweep(path), jobs=2, progress=False, log=again.append)
    assert all(v.startswith("skipped") for v in outcome.values()) and len(records(path)) == 1
    assert again[0] == "sweep: 5 of 5 runs already finished, skipped"


def test_the_loop_through_fit_law_ladder_law_validation_plan_check(tmp_path):
    """fit_law's law.json drives --validate, and fit_law --validation-runs reads its runs back."""
    from kis_megatron.law.analysis import Options, analyze
    from kis_megatron.law.outputs import write_outputs
    from kis_megatron.law.runs import extract_runs

    models = [{"name": f"d{d}", "overrides": {"model.dim": d}} for d in (16, 24, 32)]
    levels = [float(v) for v in np.geomspace(1, 64, 7)]
    path = write_sweep(tmp_path, {"model": models, "infusion": {**VALUE, "values": levels}}, refine=REFINE,
                       validate={**VALIDATE, "levels": 7, "spacing": 0.1})
    sweep = load_sweep(path)

    def truth(run):  # CP = 5e-3 * N^0.8, a smooth fall with its plateau inside the levels
        cp = 5e-3 * run.params ** 0.8
        return lambda x: 0.2 + 0.7 / (1 + (x / cp) ** 4)

    for run in sweep.runs:
        finish([run], truth(run))
    rows, _ = extract_runs([str(r.run_dir) for r in sweep.runs])
    options = Options(chance=0.2, n_boot=20, fit="two-stage")
    write_outputs(analyze(rows, options), str(tmp_path / "law"), None)
    vsweep = validation_sweep(load_sweep(path), tmp_path / "law" / "law.json", log=lambda s: None)
    for run in vsweep.runs:
        finish([run], truth(run))
    vrows, _ = extract_runs([str(r.run_dir) for r in vsweep.runs])
    check = analyze(rows, options, validation_rows=vrows).validation
    plan = json.loads((tmp_path / "runs_validate" / PLAN_FILE).read_text())
    assert check["predicted"] == pytest.approx(plan["curves"][0]["predicted"], rel=1e-9)
    assert check["levels"] == pytest.approx(plan["curves"][0]["levels"])
    assert check["measured"] == pytest.approx(5e-3 * vsweep.runs[0].params ** 0.8, rel=0.1)


def test_a_refit_with_the_same_coefficients_keeps_the_refined_levels(tmp_path):
    path = write_sweep(tmp_path, {"model": MODELS, "infusion": VALUE}, refine=REFINE, validate=VALIDATE)
    law = write_law(tmp_path / "law.json")
    vsweep = validation_sweep(load_sweep(path), law, log=lambda s: None)
    finish(vsweep.runs, lambda x: 0.9)
    assert plan_refinement(vsweep, n_boot=N_BOOT, log=lambda s: None).new_runs
    doc = json.loads(law.read_text())
    law.write_text(json.dumps({**doc, "validation": {"measured": 1.0}}))  # fit_law --validation-runs
    with pytest.raises(ConfigError, match="it predicts the same levels"):
        validation_sweep(load_sweep(path), law, log=lambda s: None)
    again = validation_sweep(load_sweep(path), law, force_new_plan=True, log=lambda s: None)
    assert [r.run_id for r in again.runs] == [r.run_id for r in vsweep.runs]  # refined level kept
    assert (tmp_path / "runs_validate" / "refine.json").is_file()
