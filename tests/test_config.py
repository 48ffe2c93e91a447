import pytest

from kis_megatron.config import ConfigError, config_from_dict, infusion_value, load_config
from kis_megatron.model.presets import PRESETS


def test_defaults_preset_yaml_and_overrides_merge_in_order(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  preset: tiny\n  dim: 32\ntrain:\n  steps: 7\n")
    cfg = load_config(f, ["train.steps=9", "model.n_layers=3", "infusion.ratio=0.25", "log.dir=/x/y"])
    assert cfg.model.dim == 32  # YAML beats the preset
    assert cfg.model.n_layers == 3  # override beats the preset
    assert cfg.model.vocab_size == PRESETS["tiny"]["vocab_size"]  # preset beats the default
    assert cfg.train.steps == 9 and cfg.infusion.ratio == 0.25 and cfg.log.dir == "/x/y"
    assert isinstance(cfg.train.lr, float)
    assert load_config(None, ["train.lr=1e-4"]).train.lr == 1e-4  # YAML 1.1 reads 1e-4 as text


@pytest.mark.parametrize("overrides, key", [
    (["train.stepz=3"], "train.stepz"),
    (["bogus.key=1"], "bogus"),
    (["train.steps=ten"], "train.steps"),
    (["train.lr=[1]"], "train.lr"),
    (["model.tie_embeddings=3"], "model.tie_embeddings"),
    (["infusion.ratio=1.0"], "infusion.ratio"),
    (["model.preset=huge"], "model.preset"),
    (["train.global_batch=10", "train.micro_batch=4"], "train.global_batch"),
    (["model.n_heads=4", "model.n_kv_heads=3", "model.dim=64"], "model.n_kv_heads"),
    (["infusion.domains=[{name: a, pathh: b}]"], "infusion.domains[0].pathh"),
    (["infusion.facts=0", "infusion.domain=d"], "infusion.facts"),
    (["infusion.facts=8"], "infusion.facts"),  # needs infusion.domain
    (["eval.max_probes=-1"], "eval.max_probes"),
])
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert key in str(e.value)


def test_missing_file_and_bad_override_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["steps"])


def test_nested_lists_and_dicts_are_typed():
    cfg = config_from_dict({"infusion": {"domains": [{"name": "bio", "path": "p", "ratio": 0.1}]}})
    assert cfg.infusion.domains[0].ratio == 0.1
    cfg = config_from_dict({"infusion": {"domain": "d", "schedule": "steps", "ratio_steps": {0: 0.1, 10: 0.2}}})
    assert cfg.infusion.ratio_steps == {0: 0.1, 10: 0.2}


def test_the_infusion_value_is_the_knob_of_infusion_kind():
    over = ["infusion.domain=d", "infusion.facts=48", "infusion.ratio=0.3"]
    facts = load_config(None, over + ["infusion.kind=domain_facts"]).infusion
    assert facts.value is None and infusion_value(facts) == 48.0  # derived, never stored
    assert infusion_value(load_config(None, over).infusion) == 0.3  # kind ratio: the ratio
    mine = load_config(None, ["infusion.kind=custom", "infusion.value=7"]).infusion
    assert infusion_value(mine) == 7.0
    several = load_config(None, ["infusion.domains=[{name: a, path: x, ratio: 0.1}, {name: b, path: y, ratio: 0.2}]"])
    assert infusion_value(several.infusion) == pytest.approx(0.3)


def test_the_learning_rate_errors_name_the_key_that_is_wrong():
    with pytest.raises(ConfigError, match=r"^train\.lr=-0\.1: must be > 0"):
        load_config(None, ["train.lr=-0.1", "train.min_lr=0"])
    with pytest.raises(ConfigError, match=r"^train\.min_lr: 0\.5 must be at most train\.lr=0\.1"):
        load_config(None, ["train.lr=0.1", "train.min_lr=0.5"])
