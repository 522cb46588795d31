"""Typed configs: every shipped YAML loads, mistakes are refused with the dotted key named."""

import json
from pathlib import Path

import pytest

from dpfeta import config

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(ROOT.glob("configs/**/*.yaml"))


def test_all_reference_configs_are_shipped():
    names = {str(p.relative_to(ROOT / "configs")) for p in SHIPPED}
    expected = {"digits.yaml"} | {
        f"{d}/eps_{e}.yaml"
        for d in ("mnist_28", "fmnist_28", "celeba_32", "camelyon_32", "cifar10_32")
        for e in (1, 10)
    }
    assert expected <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_config_loads_and_validates(path):
    cfg = config.load(path)
    assert cfg.privacy.accountant in config.ACCOUNTANTS
    if "eps_1." in path.name:
        assert cfg.privacy.epsilon == 1.0
    if "eps_10." in path.name:
        assert cfg.privacy.epsilon == 10.0


def test_reference_hyperparameters_of_mnist():
    cfg = config.load(ROOT / "configs/mnist_28/eps_1.yaml")
    assert (cfg.central.rounds, cfg.central.noise_multiplier, cfg.central.batch_size) == (5, 5.0, 6000.0)
    assert cfg.model.channel_mult == (2, 2) and cfg.model.attn_resolutions == (14,)
    assert (cfg.finetune.batch_size, cfg.finetune.epochs, cfg.finetune.noise_multiplicity) == (4096, 150, 32)
    assert cfg.finetune.max_grad_norm == 1.0 and cfg.privacy.delta == 1e-5
    assert cfg.warmup.steps == 2000 and cfg.warmup.randaug_magnitude == 3


def test_overrides_are_parsed_to_the_field_type():
    cfg = config.load(
        ROOT / "configs/digits.yaml",
        [
            "privacy.epsilon=1",
            "finetune.noise_multiplicity=8",
            "run.seed=3",
            "model.channel_mult=[1,2]",
            "run.num_workers=[2, 8]",
            "tracking.nondp=false",
            "privacy.delta=1e-6",
            "eval.fid.inception_weights=/w/pt_inception.pth",
        ],
    )
    assert cfg.privacy.epsilon == 1.0 and isinstance(cfg.privacy.epsilon, float)
    assert cfg.finetune.noise_multiplicity == 8
    assert cfg.run.seed == 3
    assert cfg.model.channel_mult == (1, 2)
    assert cfg.run.num_workers == (2, 8)
    assert cfg.tracking.nondp is False
    assert cfg.privacy.delta == 1e-6
    assert cfg.eval.fid.inception_weights == "/w/pt_inception.pth"


def test_exponents_without_a_dot_are_numbers_also_inside_mappings(tmp_path):
    """YAML 1.1 reads 1e-4 as the string '1e-4'; a search space bound written so must be a number."""
    space = '{"finetune.lr": {"type": "loguniform", "lower": 1e-4, "upper": 1E-3}}'
    cfg = config.load(ROOT / "configs/digits.yaml", [f"tune.search_space={space}", "run.name=1e5"])
    assert cfg.tune.search_space["finetune.lr"] == {"type": "loguniform", "lower": 1e-4, "upper": 1e-3}
    assert cfg.run.name == "1e5"  # a string key keeps its text
    path = tmp_path / "c.yaml"
    path.write_text(
        "privacy:\n  delta: 1e-6\ntune:\n  search_space:\n    finetune.lr: {type: loguniform, "
        "lower: 3e-5, upper: 3.0e-4}\n    warmup.steps: {type: choice, values: ['1e3', 2e3]}\n"
    )
    cfg = config.load(path)
    assert cfg.privacy.delta == 1e-6
    assert cfg.tune.search_space["finetune.lr"]["lower"] == 3e-5
    assert cfg.tune.search_space["warmup.steps"]["values"] == ["1e3", 2000.0]  # quoted stays a string


@pytest.mark.parametrize(
    "override,pattern",
    [
        ("privacy.epsilom=1", r"unknown config key 'privacy\.epsilom'"),
        ("privcy.epsilon=1", r"unknown config key 'privcy'"),
        ("eval.fid.weights=x", r"unknown config key 'eval\.fid\.weights'"),
        ("finetune.noise_multiplicity=two", r"'finetune\.noise_multiplicity': expected an integer"),
        ("finetune.noise_multiplicity=2.5", r"'finetune\.noise_multiplicity': expected an integer"),
        ("privacy.epsilon=[1]", r"'privacy\.epsilon': expected a number"),
        ("tracking.nondp=maybe", r"'tracking\.nondp': expected true or false"),
        ("run.num_workers=[1,2,3]", r"'run\.num_workers'"),
        ("privacy.accountant=prv", r"'privacy\.accountant': expected one of auto, rdp, pld"),
        ("finetune.noise_multiplicity=0", r"'finetune\.noise_multiplicity': expected K >= 1"),
        ("privacy.delta=1", r"'privacy\.delta'"),
        ("data.source=hdf5", r"'data\.source'"),
        ("run.num_workers=[3,2]", r"'run\.num_workers'"),
        ("privacy.epsilon", r"expected the form section\.key=value"),
    ],
)
def test_mistakes_name_the_key(override, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        config.load(ROOT / "configs/digits.yaml", [override])


def test_unknown_key_in_yaml_names_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("finetune:\n  batch_size: 64\n  lr_schedule: cosine\n")
    with pytest.raises(ValueError, match=r"unknown config key 'finetune\.lr_schedule'"):
        config.load(bad)
    with pytest.raises(ValueError, match="config file not found"):
        config.load(tmp_path / "missing.yaml")


def test_private_tuning_refuses_asha():
    with pytest.raises(ValueError, match=r"'tune\.scheduler'.*adaptive"):
        config.load(ROOT / "configs/digits.yaml", ["tune.privacy_mode=private", "tune.scheduler=asha"])
    cfg = config.load(ROOT / "configs/digits.yaml", ["tune.privacy_mode=naive", "tune.scheduler=asha"])
    assert cfg.tune.scheduler == "asha"


def test_cross_field_checks_against_n():
    cfg = config.load(ROOT / "configs/digits.yaml")
    with pytest.raises(ValueError, match=r"'finetune\.batch_size'.*N=200"):
        config.validate_against_n(config.replace(cfg, {"central.batch_size": 100}), 200)
    with pytest.raises(ValueError, match=r"delta < 1/N"):
        config.validate_against_n(config.replace(cfg, {"privacy.delta": 1e-3}), 5000)
    advice = config.validate_against_n(config.replace(cfg, {"privacy.delta": 1e-4}), 5000)
    assert advice and "delta" in advice[0]
    assert config.validate_against_n(cfg, 1300) == []


def test_dump_and_flat_round_trip(tmp_path):
    cfg = config.load(ROOT / "configs/mnist_28/eps_10.yaml", ["run.num_workers=[2,8]"])
    cfg.dump(tmp_path / "config.json")
    again = config.load(tmp_path / "config.json")
    assert again == cfg
    flat = cfg.flat()
    assert flat["privacy.epsilon"] == 10.0
    assert flat["eval.fid.num_samples"] == 60000
    assert json.loads(flat["model.channel_mult"]) == [2, 2]
    assert json.loads(flat["run.num_workers"]) == [2, 8]
    assert all("." in k for k in flat)
