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


@pytest.mark.parametrize(
    "override, message",
    [
        ("factors.top_k=0", "factors.top_k: Input should be greater than or equal to 1"),
        ("gradients.num_workers=0", "gradients.num_workers: Input should be greater than or equal to 1"),
        ("dictionary.cpus_per_worker=0", "dictionary.cpus_per_worker: Input should be greater than 0"),
        ("coherence.gpus_per_worker=-1", "coherence.gpus_per_worker"),
        ("finetune.warmup_fraction=1.5", "finetune.warmup_fraction: Input should be less than or equal to 1"),
        ("finetune.lora.dropout=1.0", "finetune.lora.dropout: Input should be less than 1"),
        ("finetune.epochs=0", "finetune.epochs: Input should be greater than 0"),
        ("dictionary.heldout_fraction=1", "dictionary.heldout_fraction: Input should be less than 1"),
        ("coherence.top_docs=1", "coherence.top_docs: Input should be greater than or equal to 2"),
        ("ray.num_cpus=0", "ray.num_cpus: Input should be greater than or equal to 1"),
        ("report.top_atoms=0", "report.top_atoms: Input should be greater than or equal to 1"),
        ("demo.pretrain_batch_size=0", "demo.pretrain_batch_size: Input should be greater than or equal to 1"),
    ],
)
def test_ranges_are_checked_at_load_time(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_renamed_resource_keys_say_the_new_name():
    for old, new in [("gradients.num_actors", "num_workers"), ("coherence.cpus_per_actor", "cpus_per_worker"),
                     ("gradients.num_gpus", "gpus_per_worker"), ("finetune.use_gpu", "gpus_per_worker")]:
        with pytest.raises(ConfigError) as e:
            load_config(None, [f"{old}=1"])
        assert f"unknown key '{old}'. Did you mean '{new}'?" in str(e.value) and "was renamed" in str(e.value)


def test_a_run_directorys_saved_config_with_old_keys_is_migrated(tmp_path):
    from ga_ray.config import section_fingerprint_data

    saved = {"gradients": {"num_actors": 2, "cpus_per_actor": 0.5, "num_gpus": "auto"}, "factors": {"use_gpu": False},
             "finetune": {"use_gpu": True}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(ConfigError, match="num_actors"):  # a config the user wrote: the did-you-mean error
        load_config(tmp_path / "config.yaml")
    (tmp_path / "manifest.json").write_text('{"stages": {}}')  # ... but a run directory's own saved config is migrated
    cfg = load_config(tmp_path / "config.yaml")
    assert (cfg.gradients.num_workers, cfg.gradients.cpus_per_worker, cfg.gradients.gpus_per_worker) == (2, 0.5, "auto")
    assert cfg.factors.gpus_per_worker == 0.0 and cfg.finetune.gpus_per_worker == 1.0
    # fingerprinted under the old names, so that runs finished before the rename are not redone
    fp = section_fingerprint_data(cfg, "gradients", "model.path")
    assert {"num_actors", "cpus_per_actor", "num_gpus"} <= set(fp["gradients"]) and "num_workers" not in fp["gradients"]
    assert fp["model.path"] is None


def test_where_only_keys_leave_the_fingerprints_alone():
    """Running small inputs in the driver instead of actors changes no result, so no stage is redone for it."""
    from ga_ray.config import WHERE_ONLY_KEYS, section_fingerprint_data

    base = load_config(None)
    moved = load_config(None, ["finetune.in_driver_max_docs=0", "factors.in_driver_max_docs=0", "gradients.in_driver_max_docs=0", "dictionary.in_driver_mb=0"])
    sections = ("finetune", "factors", "gradients", "dictionary")
    assert section_fingerprint_data(base, *sections) == section_fingerprint_data(moved, *sections)
    assert "in_driver_max_docs" not in section_fingerprint_data(base, "gradients")["gradients"]
    # every such key exists, and a key that changes results still changes the fingerprint
    for section, keys in WHERE_ONLY_KEYS.items():
        assert keys <= set(type(getattr(base, section)).model_fields)
    other = load_config(None, ["dictionary.forget_exponent=1"])
    assert section_fingerprint_data(base, "dictionary") != section_fingerprint_data(other, "dictionary")
