"""`dpfeta budget`: the plan from public facts, as a table and as JSON; refusals exit non-zero."""

import json
from pathlib import Path

import pytest

from dpfeta import cli

ROOT = Path(__file__).resolve().parents[1]


def test_budget_json_keys_and_values(capsys):
    assert cli.main(["budget", "--config", str(ROOT / "configs/mnist_28/eps_10.yaml"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"epsilon", "delta", "accountant", "noise_multiplier", "sample_rate", "steps", "mechanisms"} <= set(out)
    assert out["epsilon"] <= 10.0 and out["accountant"] == "rdp" and out["steps"] == 2198
    assert out["noise_multiplier"] == pytest.approx(1.84, rel=0.015)
    names = [m["name"] for m in out["mechanisms"]]
    assert names == ["central", "dpsgd"]
    central = out["mechanisms"][0]
    assert (central["noise_multiplier"], central["sample_rate"], central["count"]) == (5.0, 0.1, 5)
    assert central["epsilon"] == pytest.approx(0.188, rel=2e-3)
    assert out["epsilon"] >= max(m["epsilon"] for m in out["mechanisms"])


def test_budget_table_for_digits_reads_no_data(capsys, monkeypatch):
    from dpfeta import data

    def no_pixels(*_a, **_k):
        raise AssertionError("budget must not read images")

    monkeypatch.setattr(data, "load_splits", no_pixels)
    assert cli.main(["budget", "--config", str(ROOT / "configs/digits.yaml")]) == 0
    out = capsys.readouterr().out
    assert "composed epsilon" in out and "accountant pld" in out and "no data was read" in out
    assert "pld is the tighter" in out and "rdp_sigma=" in out  # privacy.accountant: auto
    for word in ("central", "dpsgd", "sigma", "T="):
        assert word in out


def test_budget_refuses_when_central_query_alone_spends_target(capsys):
    argv = ["budget", "--config", str(ROOT / "configs/mnist_28/eps_1.yaml"), "--set", "privacy.epsilon=0.1"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "central-image query alone spends epsilon=0.1883" in err
    assert "privacy.epsilon=0.1" in err


def test_budget_bad_key_exits_nonzero_naming_it(capsys):
    assert cli.main(["budget", "--config", str(ROOT / "configs/digits.yaml"), "--set", "privacy.eps=1"]) == 2
    assert "privacy.eps" in capsys.readouterr().err


def test_budget_sweep_plan_shows_the_sigma_penalty(capsys):
    assert cli.main(["budget", "--config", str(ROOT / "configs/digits.yaml"), "--sweep", "--json"]) == 0
    sweep = json.loads(capsys.readouterr().out)
    assert cli.main(["budget", "--config", str(ROOT / "configs/digits.yaml"), "--json"]) == 0
    single = json.loads(capsys.readouterr().out)
    assert sweep["mode"] == "private" and sweep["accountant"] == "rdp"
    # the sweep compares in RDP; the single run (accountant auto) reports its RDP sigma beside its PLD one
    assert single["accountant"] == "pld" and single["noise_multiplier"] < single["accountant_compared"]["rdp_sigma"]
    assert sweep["single_sigma"] == pytest.approx(single["accountant_compared"]["rdp_sigma"], rel=1e-6)
    assert sweep["trial_sigma"] > sweep["single_sigma"]  # tuning privately costs noise
    assert sweep["penalty"] == pytest.approx(sweep["trial_sigma"] / sweep["single_sigma"], rel=1e-9)
    assert sweep["epsilon"] <= 10.0 and sweep["epsilon_per_trial"] < sweep["epsilon"]
