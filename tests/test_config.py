"""Typed configuration: YAML, --set overrides, and errors that name the key and the allowed ones."""

from __future__ import annotations

import pytest
import yaml

from ga_ray.config import PACKAGED_CONFIGS, ConfigError, RunConfig, dump_config, load_config


def test_defaults_and_overrides():
    cfg = load_config(None, ["dictionary.n_atoms=1000", "finetune.epochs=3", "finetune.lora.target_modules=[q_proj,k_proj]"])
    assert cfg.dictionary.n_atoms == 1000
    assert cfg.finetune.epochs == 3.0
    assert cfg.finetune.lora.target_modules == ["q_proj", "k_proj"]
    assert cfg.factors.top_k == 50 and cfg.dictionary.alpha == 0.1


def test_unknown_key_names_key_and_allowed(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("dictionary:\n  n_atom: 10\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg
    assert "unknown key 'dictionary.n_atom'" in msg and "Did you mean 'n_atoms'?" in msg
    assert "Allowed keys here: alpha, backend" in msg


def test_unknown_section_and_bad_type():
    with pytest.raises(ConfigError, match=r"unknown key 'dictonary'.*Did you mean 'dictionary'"):
        load_config(None, ["dictonary.n_atoms=3"])
    with pytest.raises(ConfigError, match=r"dictionary.n_atoms: Input should be a valid integer.*'many'"):
        load_config(None, ["dictionary.n_atoms=many"])
    with pytest.raises(ConfigError, match=r"factors.fisher: Input should be 'true' or 'empirical'"):
        load_config(None, ["factors.fisher=sampled"])
    with pytest.raises(ConfigError, match=r"demo.pretrain_pool_plain_share: Input should be less than or equal to 1.*1.5"):
        load_config(None, ["demo.pretrain_pool_plain_share=1.5"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["dictionary.n_atoms"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("no_such_config")


def test_every_field_documented():
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no docstring"
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, RunConfig.__mro__[1]):
                walk(ann)

    walk(RunConfig)


@pytest.mark.parametrize("path", sorted(PACKAGED_CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_packaged_configs_load_and_round_trip(path):
    cfg = load_config(path)
    again = RunConfig.model_validate(yaml.safe_load(dump_config(cfg)))
    assert again == cfg
