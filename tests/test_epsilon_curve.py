"""epsilon off the step path: the curve of a plan is the ledger's own composition at each report step,
its last point equals the ledger's final epsilon, and the fine-tuning loop reports it without calling
the accountant on its own thread."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from conftest import tiny_config
from torch import nn

from dpfeta import finetune, privacy
from dpfeta.data import ImageSet
from dpfeta.privacy import ledger as ledger_mod


def _ledger(accountant: str, *, central: bool = True) -> privacy.Ledger:
    ledger = privacy.Ledger(accountant=accountant, delta=1e-5, n=1258)
    if central:
        ledger.add("central", noise_multiplier=4.0, sample_rate=0.95, count=2, taken=2)
    ledger.add("dpsgd", noise_multiplier=1.1, sample_rate=0.2, count=12)
    return ledger


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_curve_is_the_ledgers_epsilon_at_each_step_and_its_last_point_the_final_one(accountant):
    ledger = _ledger(accountant)
    steps = [3, 6, 12]
    curve = privacy.epsilon_curve(ledger, "dpsgd", steps)
    assert list(curve) == steps and ledger.get("dpsgd").taken == 0  # the ledger itself is untouched
    for step in steps:
        ledger.record_steps("dpsgd", step)
        assert curve[step] == pytest.approx(ledger.epsilon(), rel=1e-9, abs=0)
    assert ledger.epsilon() == pytest.approx(curve[12], rel=1e-9, abs=0)  # the authority at T
    assert ledger.epsilon() == pytest.approx(ledger.epsilon(planned=True), rel=1e-9)
    values = [curve[s] for s in steps]
    assert values == sorted(values) and values[0] > 0  # more steps spend more


def test_background_pld_curve_composes_live_points_on_the_coarse_grid_and_the_last_on_the_ledgers():
    ledger = _ledger("pld")
    curve = privacy.EpsilonCurve(ledger, "dpsgd", [4, 8, 12])
    exact = privacy.epsilon_curve(ledger, "dpsgd", [4, 8, 12])
    assert curve.at(12) == exact[12]  # the run's total, bit for bit the ledger's
    for step in (4, 8):
        ledger_coarse = privacy.Ledger.from_state_dict(ledger.state_dict())
        ledger_coarse.record_steps("dpsgd", step)
        assert curve.at(step) == ledger_coarse.epsilon(pld_interval=privacy.PLD_COARSE_INTERVAL)
        assert exact[step] <= curve.at(step) <= exact[step] * 1.1  # pessimistic, and close
    curve.close()


def test_background_curve_gives_the_same_points_and_refuses_other_steps_and_ledgers():
    ledger = _ledger("rdp")
    curve = privacy.EpsilonCurve(ledger, "dpsgd", [12, 4, 8, 4])
    assert curve.steps == [4, 8, 12]
    direct = privacy.epsilon_curve(ledger, "dpsgd", [4, 8, 12])
    assert [curve.at(s) for s in (12, 4, 8)] == [direct[12], direct[4], direct[8]]
    with pytest.raises(ValueError, match="step=5"):
        curve.at(5)
    ledger.record_steps("dpsgd", 8)
    assert curve.matches(ledger, 8) and not curve.matches(ledger, 4)
    assert not curve.matches(_ledger("rdp", central=False), 8)
    with pytest.raises(KeyError):
        privacy.EpsilonCurve(ledger, "nope", [1])
    curve.close()


def test_a_failing_point_reaches_the_caller(monkeypatch):
    def broken(self, planned=False, **kwargs):
        raise ArithmeticError("accountant broke")

    monkeypatch.setattr(ledger_mod.Ledger, "epsilon", broken)
    curve = privacy.EpsilonCurve(_ledger("rdp"), "dpsgd", [1, 2])
    with pytest.raises(RuntimeError, match="failed before step 2") as info:
        curve.at(2)
    assert isinstance(info.value.__cause__, ArithmeticError)


# A linear stand-in: the loop's reports, not the network, are the point.
def _linear(cfg):
    return nn.Linear(64, 1)


def _rows(module, images, labels, cfg, generator, draws):
    return (0.01 * module(images.flatten(1)).squeeze(1).pow(2)).repeat_interleave(len(draws))


LINEAR = finetune.Task(build=_linear, loss_rows=_rows, optimizer=lambda p, cfg: torch.optim.SGD(p, lr=0.1))


def test_loop_reports_the_curve_and_never_calls_the_accountant_on_its_thread(tmp_path, monkeypatch):
    cfg = tiny_config(
        "central.rounds=2",
        "central.noise_multiplier=4.0",
        "central.batch_size=60",
        "finetune.init=scratch",
        "finetune.batch_size=20",
        "finetune.epochs=1.2",
        "finetune.log_every=2",
        "finetune.checkpoint_every=5",
        "privacy.noise_multiplier=1.5",
        "privacy.epsilon=1000",
        "privacy.accountant=pld",
        "run.seed=0",
    )
    rng = np.random.default_rng(0)
    train = ImageSet(rng.integers(0, 256, (100, 1, 8, 8), dtype=np.uint8), rng.integers(0, 10, 100), 10)
    plan = privacy.plan(cfg, len(train))
    assert plan.steps == 6  # reports at 2, 4, 5 (a checkpoint) and 6
    callers = []
    real = ledger_mod.Ledger.epsilon

    def spy(self, planned=False, **kwargs):
        callers.append(threading.current_thread().name)
        return real(self, planned, **kwargs)

    monkeypatch.setattr(ledger_mod.Ledger, "epsilon", spy)
    reporter = finetune.LocalReporter(tmp_path / "ckpt")
    final = finetune.train_finetune(
        cfg, train, plan=plan, init_dir=None, resume_dir=None, reporter=reporter, task=LINEAR
    )
    reported = {h["step"]: h["epsilon"] for h in reporter.history}
    expected = [t for t in range(1, plan.steps + 1) if t % 2 == 0 or t % 5 == 0 or t == plan.steps]
    assert list(reported) == expected
    assert callers and set(callers) == {"epsilon-curve"}  # every accountant call off the training thread
    monkeypatch.setattr(ledger_mod.Ledger, "epsilon", real)
    ledger = privacy.Ledger.from_state_dict(finetune.checkpoint.load(reporter.resume_dir())["meta"]["ledger"])
    assert final["epsilon"] == pytest.approx(ledger.epsilon(), rel=1e-9, abs=0)  # the ledger's final epsilon
    exact = privacy.epsilon_curve(finetune.start_ledger(plan), "dpsgd", expected)
    assert reported[plan.steps] == pytest.approx(exact[plan.steps], rel=1e-9, abs=0)  # the total: the ledger's grid
    for step in expected[:-1]:  # live values: the coarse PLD grid, an upper bound close to the ledger's
        assert exact[step] * (1 - 1e-9) <= reported[step] <= exact[step] * 1.1, (step, reported[step], exact[step])
