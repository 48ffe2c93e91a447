"""``kis-train --help-config`` and ``--print-config``: the list is generated from the config
dataclasses (every key, its domain and the comment beside it in config.py), and the printed
config reads back as the same config."""

from __future__ import annotations

import dataclasses

from kis_megatron.config import Config, load_config
from kis_megatron.config_help import config_keys, help_config
from kis_megatron.train import main


def leaf_keys(cls=Config, prefix="") -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out += leaf_keys(type(default), f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def test_every_key_listed_with_its_domain_and_comment():
    keys = {k["key"]: k for k in config_keys()}
    assert sorted(keys) == sorted(leaf_keys())
    assert keys["train.lr"]["allowed"] == "> 0" and keys["train.lr"]["default"] == 3e-4
    assert keys["train.schedule"]["allowed"] == "cosine | wsd | constant"
    assert keys["train.stop_after"]["comment"].startswith("end this job after that step")
    # a comment block above a field describes it
    assert keys["train.skip_nonfinite_steps"]["comment"].startswith("Steps whose loss or gradient norm")
    assert keys["train.profile.start"]["comment"].startswith("first profiled step")
    assert keys["parallel.pp_layers"]["type"] == "list[int]" and keys["parallel.pp_layers"]["default"] == []
    text = help_config()
    assert all(k in text for k in leaf_keys())


def test_help_config_and_print_config_on_the_command_line(capsys, tmp_path):
    assert main(["--help-config"]) == 0
    assert "train.micro_batch" in capsys.readouterr().out
    assert main(["train.steps=7", "model.dim=48", "--print-config"]) == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    again = load_config(printed)
    assert again.to_dict() == load_config(None, ["train.steps=7", "model.dim=48"]).to_dict()
    assert again.train.steps == 7 and not (tmp_path / "runs").exists()
