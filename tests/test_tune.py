"""Sweep accounting, search spaces, trial counts and the DP score (no Ray; docs/privacy.md §6).

The sweep's epsilon is checked against events built here directly from dp_accounting, not through
dpfeta.privacy or dpfeta.tune's curve code.
"""

import dataclasses
import json
import logging
import math

import numpy as np
import pytest
from dp_accounting import dp_event, pld, rdp

from dpfeta import config, privacy, tune
from dpfeta.privacy import repeat as prepeat
from dpfeta.privacy import sweep as psweep
from dpfeta.privacy import trial as ptrial

logging.getLogger("absl").setLevel(logging.ERROR)

DIGITS_N = 1258
# Cheap accounting: explicit central noise, small sample rates (few dp_accounting convergence loops).
FAST = [
    "central.noise_multiplier=2.0",
    "central.batch_size=100",
    "central.rounds=2",
    "finetune.batch_size=64",
    "finetune.epochs=1",
]
SPACE = {
    "central.rounds": {"type": "randint", "lower": 1, "upper": 4},
    "central.noise_multiplier": {"type": "uniform", "lower": 2.0, "upper": 4.0},
    "warmup.steps": {"type": "choice", "values": [2, 4]},
}


def _cfg(*overrides, space=None):
    cfg = config.load("configs/digits.yaml", [*FAST, *overrides])
    if space is not None:
        cfg = config.replace(cfg, {"tune.search_space": space})
    return cfg


def _poisson_gaussian(q, sigma, count):
    return dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), count)


def _trial_event(rounds, sigma_c, q_c, sigma, q, steps, sigma_v):
    parts = [_poisson_gaussian(q, sigma, steps), dp_event.GaussianDpEvent(sigma_v)]
    if rounds:
        parts.insert(0, _poisson_gaussian(q_c, sigma_c, rounds))
    return dp_event.ComposedDpEvent(parts)


def _rdp_epsilon(event, delta=1e-5):
    acc = rdp.RdpAccountant()
    acc.compose(event)
    return acc.get_epsilon(delta)


# --------------------------------------------------------------------------------------------
# Search space
# --------------------------------------------------------------------------------------------


def test_search_space_becomes_ray_domains_within_bounds():
    space = tune.check_search_space(_cfg(space=SPACE))
    domains = tune.search_space(space)
    rng = np.random.RandomState(0)
    rounds = [domains["central.rounds"].sample(random_state=rng) for _ in range(200)]
    assert set(rounds) == {1, 2, 3}  # Ray's randint: upper exclusive
    sigmas = [domains["central.noise_multiplier"].sample(random_state=rng) for _ in range(200)]
    assert 2.0 <= min(sigmas) and max(sigmas) <= 4.0
    assert {domains["warmup.steps"].sample(random_state=rng) for _ in range(50)} == {2, 4}
    assert ptrial.extremes(space["central.rounds"]) == [1, 3]


@pytest.mark.parametrize(
    "key,spec,match",
    [
        ("privacy.epsilon", {"type": "uniform", "lower": 1, "upper": 2}, "budget"),
        ("data.resolution", {"type": "choice", "values": [8, 16]}, "budget"),
        ("central.rounds", {"type": "gaussian", "mean": 1}, "type one of"),
        ("central.rounds", {"type": "randint", "lower": 2}, "fields"),
        ("central.rounds", {"type": "randint", "lower": 5, "upper": 2}, "lower < upper"),
        ("central.rounds", {"type": "uniform", "lower": 1, "upper": 4}, "integer"),  # float draws into an int key
        ("central.noise_multiplier", {"type": "randn", "mean": 3, "sd": 1}, "bounded"),
        ("warmup.steps", {"type": "grid", "values": [1, 2]}, "i.i.d."),  # private mode: no grid
        ("warmup.stepz", {"type": "choice", "values": [1]}, "unknown config key"),
    ],
)
def test_search_space_refusals(key, spec, match):
    with pytest.raises((ValueError, TypeError), match=match):
        tune.check_search_space(_cfg(space={key: spec}))


def test_grid_is_fine_in_naive_mode():
    cfg = _cfg("tune.privacy_mode=naive", space={"warmup.steps": {"type": "grid", "values": [1, 2]}})
    assert tune.check_search_space(cfg)


# --------------------------------------------------------------------------------------------
# Schedulers
# --------------------------------------------------------------------------------------------


def test_private_refuses_asha():
    with pytest.raises(ValueError, match="fifo"):
        _cfg("tune.scheduler=asha")  # private is the default mode
    # The sweep revalidates (also for configs built around config.validate):
    bad = dataclasses.replace(_cfg(), tune=dataclasses.replace(_cfg().tune, scheduler="asha"))
    with pytest.raises(ValueError, match="ASHA.*random-stopping"):
        tune.plan_sweep(bad, DIGITS_N)
    # naive mode allows it; a non-DP metric is refused outside public mode
    assert _cfg("tune.privacy_mode=naive", "tune.scheduler=asha").tune.scheduler == "asha"
    with pytest.raises(ValueError, match="leaks"):
        _cfg("tune.privacy_mode=naive", "tune.metric=nondp/loss")


# --------------------------------------------------------------------------------------------
# The random number of trials
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [0.0, 0.5, 1.0, 2.0, math.inf])
def test_trial_count_has_the_accounted_mean(shape):
    mean = 4.0
    rng = np.random.default_rng(123)
    draws = np.array([prepeat.draw_num_trials(mean, shape, rng) for _ in range(20000)])
    if not math.isinf(shape):
        assert draws.min() >= 1  # truncated: never an empty sweep
    assert draws.mean() == pytest.approx(mean, rel=0.03)


def test_geometric_trial_count_pmf():
    mean, rng = 3.0, np.random.default_rng(7)
    gamma = privacy.tnb_gamma(mean, 1.0)
    assert gamma == pytest.approx(1 / 3)
    draws = np.array([prepeat.draw_num_trials(mean, 1.0, rng) for _ in range(30000)])
    for k in (1, 2, 3, 5):
        expected = (1 - gamma) ** (k - 1) * gamma  # Papernot-Steinke TNB(eta=1, gamma)
        assert np.mean(draws == k) == pytest.approx(expected, abs=0.01)


def test_trial_count_is_fresh_without_a_seed():
    draws = {prepeat.draw_num_trials(10.0, 1.0, np.random.default_rng()) for _ in range(40)}
    assert len(draws) > 3


# --------------------------------------------------------------------------------------------
# The DP score (M3)
# --------------------------------------------------------------------------------------------


def test_score_noise_has_the_configured_scale():
    sigma_v, val_size, correct = 10.0, 180, 150
    rng = np.random.default_rng(0)
    scores = np.array([prepeat.dp_score(correct, val_size, sigma_v=sigma_v, rng=rng) for _ in range(20000)])
    assert scores.mean() == pytest.approx(correct / val_size, abs=3 * sigma_v / val_size / math.sqrt(20000))
    assert scores.std() == pytest.approx(sigma_v / val_size, rel=0.03)
    with pytest.raises(ValueError, match="val_fraction"):
        prepeat.dp_score(1, 0, sigma_v=1.0, rng=rng)


# --------------------------------------------------------------------------------------------
# The sweep plan against independent dp_accounting computations
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def private_plan():
    cfg = privacy.resolve(_cfg(space=SPACE), DIGITS_N)
    return cfg, tune.plan_sweep(cfg, DIGITS_N)


def test_private_sweep_epsilon_is_the_repeat_and_select_total(private_plan):
    cfg, sp = private_plan
    ref, t = sp.to_dict()["reference"], cfg.tune
    assert (ref["rounds"], ref["sigma_c"]) == (3, 2.0)  # worst corner of the space
    assert ref["q_c"] == pytest.approx(100 / DIGITS_N) and ref["q"] == pytest.approx(64 / DIGITS_N)
    assert ref["steps"] == math.ceil(DIGITS_N / 64)
    event = dp_event.RepeatAndSelectDpEvent(
        _trial_event(3, 2.0, 100 / DIGITS_N, sp.trial_noise_multiplier, 64 / DIGITS_N, ref["steps"], t.score_noise),
        t.num_trials,
        t.tnb_eta,
    )
    eps = _rdp_epsilon(event)
    assert eps <= sp.epsilon * (1 + 1e-9) <= cfg.privacy.epsilon  # full order grid: never above
    assert eps == pytest.approx(cfg.privacy.epsilon, rel=2e-3)  # and the smallest sigma to do it
    # the penalty is real: a single untuned run gets less noise
    assert sp.single_noise_multiplier < sp.trial_noise_multiplier
    # PLD cannot account RepeatAndSelect: the sweep says so and uses RDP
    assert not pld.PLDAccountant().supports(event)


def test_each_trial_sigma_stays_under_the_reference(private_plan):
    cfg, sp = private_plan
    ref, t = sp.to_dict()["reference"], cfg.tune
    orders = tuple(ref["orders"])
    bound = np.asarray(ref["rdp"])
    for rounds, sigma_c in [(3, 2.0), (1, 2.0), (2, 3.5), (3, 4.0)]:
        trial_cfg = config.replace(cfg, {"central.rounds": rounds, "central.noise_multiplier": sigma_c})
        sigma = ptrial.trial_noise_multiplier(sp, trial_cfg, DIGITS_N)
        assert sigma <= sp.trial_noise_multiplier * (1 + 1e-12)
        acc = rdp.RdpAccountant(list(orders))
        acc.compose(_trial_event(rounds, sigma_c, ref["q_c"], sigma, ref["q"], ref["steps"], t.score_noise))
        assert np.all(acc.rdp <= bound * (1 + 1e-9) + 1e-12)
        whole = dp_event.RepeatAndSelectDpEvent(
            _trial_event(rounds, sigma_c, ref["q_c"], sigma, ref["q"], ref["steps"], t.score_noise),
            t.num_trials,
            t.tnb_eta,
        )
        assert _rdp_epsilon(whole) <= cfg.privacy.epsilon
        ledger = ptrial.trial_plan(sp, trial_cfg, DIGITS_N, sigma).ledger
        assert ledger.repeat == {"mean": t.num_trials, "shape": t.tnb_eta}
        assert [m.name for m in ledger.mechanisms] == ["central", "dpsgd", "selection"]


def test_naive_sweep_epsilon_is_k_composed_trials():
    cfg = privacy.resolve(_cfg("tune.privacy_mode=naive", "tune.num_trials=3", "tune.central=per_trial"), DIGITS_N)
    sp = tune.plan_sweep(cfg, DIGITS_N)
    assert sp.central == "per_trial" and sp.shared_central is None
    ref = sp.to_dict()["reference"]
    trial = _trial_event(2, 2.0, 100 / DIGITS_N, sp.trial_noise_multiplier, 64 / DIGITS_N, ref["steps"], 10.0)
    eps = _rdp_epsilon(dp_event.SelfComposedDpEvent(trial, 3))
    assert eps <= cfg.privacy.epsilon and eps == pytest.approx(cfg.privacy.epsilon, rel=2e-3)
    assert sp.trials == {"count": 3}
    assert sp.trial_noise_multiplier > sp.single_noise_multiplier


# Shared central images: M1 once, then the repeat-and-select (or k-fold composition) of M2 + M3.
LOW = [
    "privacy.epsilon=1",
    "central.noise_multiplier=null",
    "central.epsilon_share=0.5",
    "tune.num_trials=2",
    "tune.score_noise=30",
]
NO_CENTRAL_KEYS = {
    "warmup.steps": {"type": "choice", "values": [2, 4]},
    "finetune.lr": {"type": "loguniform", "lower": 1e-4, "upper": 1e-3},
}


def _shared_event(sc, sigma, steps, sigma_v, *, mean=None, shape=None, k=None):
    inner = dp_event.ComposedDpEvent(
        [_poisson_gaussian(64 / DIGITS_N, sigma, steps), dp_event.GaussianDpEvent(sigma_v)]
    )
    trials = (
        dp_event.RepeatAndSelectDpEvent(inner, mean, shape) if k is None else dp_event.SelfComposedDpEvent(inner, k)
    )
    return dp_event.ComposedDpEvent([_poisson_gaussian(sc["q_c"], sc["sigma_c"], sc["rounds"]), trials])


def test_shared_central_is_composed_once_outside_the_repeat():
    cfg = privacy.resolve(_cfg(*LOW, space=NO_CENTRAL_KEYS), DIGITS_N)  # tune.central: auto
    sp = tune.plan_sweep(cfg, DIGITS_N)
    sc, ref, t = sp.to_dict()["shared_central"], sp.to_dict()["reference"], cfg.tune
    assert sp.central == "shared" and sc["rounds"] == 2 and sc["q_c"] == pytest.approx(100 / DIGITS_N)
    assert sc["sigma_c"] == pytest.approx(cfg.central.noise_multiplier)
    # the central query alone spends its share (calibrated as in a single run)
    assert _rdp_epsilon(_poisson_gaussian(sc["q_c"], sc["sigma_c"], 2)) == pytest.approx(0.5, rel=2e-3)
    eps = _rdp_epsilon(_shared_event(sc, sp.trial_noise_multiplier, ref["steps"], 30.0, mean=2.0, shape=t.tnb_eta))
    assert eps <= sp.epsilon * (1 + 1e-9) <= 1.0 and eps == pytest.approx(1.0, rel=2e-3)
    # the per-trial plan of the same sweep puts the query inside the repeat: more noise for DP-SGD
    per_trial = tune.plan_sweep(config.replace(cfg, {"tune.central": "per_trial"}), DIGITS_N)
    assert per_trial.central == "per_trial" and sp.trial_noise_multiplier < per_trial.trial_noise_multiplier
    worse = dp_event.RepeatAndSelectDpEvent(
        _trial_event(2, sc["sigma_c"], sc["q_c"], sp.trial_noise_multiplier, 64 / DIGITS_N, ref["steps"], 30.0),
        2.0,
        t.tnb_eta,
    )
    assert _rdp_epsilon(worse) > 1.0  # shared sigma inside the repeat would overshoot
    # a trial's ledger: the query shared (taken before the trial), its epsilon the same total
    sigma = ptrial.trial_noise_multiplier(sp, config.replace(cfg, {"warmup.steps": 4, "finetune.lr": 5e-4}), DIGITS_N)
    assert sigma == pytest.approx(sp.trial_noise_multiplier, rel=1e-9)
    trial = ptrial.trial_plan(sp, cfg, DIGITS_N, sigma)
    central = trial.ledger.get("central")
    assert central.shared and central.taken == 2 and not trial.ledger.get("dpsgd").shared
    assert trial.epsilon == pytest.approx(sp.epsilon, rel=1e-9)
    assert trial.ledger.epsilon(planned=True) == pytest.approx(eps, rel=1e-9)
    # before the trial ran, the ledger's spend is the query alone
    assert trial.ledger.epsilon() == pytest.approx(_rdp_epsilon(_poisson_gaussian(sc["q_c"], sc["sigma_c"], 2)))
    restored = privacy.Ledger.from_state_dict(json.loads(json.dumps(trial.ledger.to_json())))
    assert restored.epsilon(planned=True) == pytest.approx(eps, rel=1e-9)
    assert "shared: one query before the trials" in psweep.sweep_plan_table(sp)


def test_shared_central_in_a_naive_sweep_and_the_refusals():
    cfg = privacy.resolve(
        _cfg(
            *LOW,
            "tune.privacy_mode=naive",
            "tune.num_trials=3",
            "tune.central=shared",
            space={"warmup.steps": {"type": "grid", "values": [2, 4, 8]}},
        ),
        DIGITS_N,
    )
    sp = tune.plan_sweep(cfg, DIGITS_N)
    eps = _rdp_epsilon(
        _shared_event(
            sp.to_dict()["shared_central"], sp.trial_noise_multiplier, sp.to_dict()["reference"]["steps"], 30.0, k=3
        )
    )
    assert eps <= sp.epsilon * (1 + 1e-9) <= 1.0 and eps == pytest.approx(1.0, rel=2e-3)
    # a searched central key: auto gives each trial its own query; shared is refused
    auto = tune.plan_sweep(privacy.resolve(_cfg(space=SPACE), DIGITS_N), DIGITS_N)
    assert auto.central == "per_trial"
    with pytest.raises(ValueError, match=r"tune.central.*central.noise_multiplier, central.rounds"):
        tune.plan_sweep(privacy.resolve(_cfg("tune.central=shared", space=SPACE), DIGITS_N), DIGITS_N)
    with pytest.raises(ValueError, match=r"'tune.central': expected auto, shared or per_trial"):
        _cfg("tune.central=once")
    # no central query: nothing to share; public mode: the trials' query is on the proxy
    assert tune.plan_sweep(_cfg("central.rounds=0", space=NO_CENTRAL_KEYS), DIGITS_N).central == "none"
    public = tune.plan_sweep(privacy.resolve(_cfg("tune.privacy_mode=public"), DIGITS_N), DIGITS_N)
    assert public.central is None and "central" not in public.to_dict()
    # the query alone over budget: refused before anything runs, saying where it runs
    with pytest.raises(ValueError, match="once, before the trials"):
        tune.plan_sweep(
            privacy.resolve(
                _cfg(*LOW, "central.epsilon_share=0.99", "tune.score_noise=5", space=NO_CENTRAL_KEYS), DIGITS_N
            ),
            DIGITS_N,
        )


def test_public_sweep_costs_nothing_and_the_final_run_gets_everything():
    cfg = privacy.resolve(_cfg("tune.privacy_mode=public"), DIGITS_N)
    sp = tune.plan_sweep(cfg, DIGITS_N)
    steps = math.ceil(DIGITS_N / 64)
    single = dp_event.ComposedDpEvent(
        [_poisson_gaussian(100 / DIGITS_N, 2.0, 2), _poisson_gaussian(64 / DIGITS_N, sp.single_noise_multiplier, steps)]
    )
    # the final run is a single run: privacy.accountant auto accounts it with PLD, the tighter
    assert cfg.privacy.accountant == "auto" and sp.accountant == "pld"
    eps = privacy.epsilon_of(single, delta=cfg.privacy.delta, accountant="pld")
    assert sp.epsilon == pytest.approx(eps, rel=1e-6)
    assert eps == pytest.approx(cfg.privacy.epsilon, rel=2e-3) and eps <= cfg.privacy.epsilon
    assert _rdp_epsilon(single) > cfg.privacy.epsilon  # the same sigma under RDP would overshoot
    assert sp.tuning_cost == 0.0 and sp.trial_noise_multiplier is None


def test_pld_config_is_accounted_with_rdp_and_says_so():
    sp = tune.plan_sweep(privacy.resolve(_cfg("tune.privacy_mode=naive", "privacy.accountant=pld"), DIGITS_N), DIGITS_N)
    assert sp.accountant == "rdp" and "RepeatAndSelectDpEvent" in sp.accountant_note
    assert "RDP" in psweep.sweep_plan_table(sp)


def test_sweep_refuses_when_the_score_alone_spends_the_budget():
    with pytest.raises(ValueError, match="tune.score_noise"):
        tune.plan_sweep(privacy.resolve(_cfg("privacy.epsilon=1", "tune.score_noise=0.3"), DIGITS_N), DIGITS_N)
    with pytest.raises(ValueError, match="privacy.noise_multiplier"):
        tune.plan_sweep(_cfg("privacy.noise_multiplier=2"), DIGITS_N)


def test_sweep_plan_is_json_and_printable(private_plan):
    _, sp = private_plan
    text = psweep.sweep_plan_table(sp)
    assert "penalty" in text and "whole sweep" in text
    small = psweep.sweep_plan_json(sp)
    assert "rdp" not in small["reference"]
    assert psweep.SweepPlan.from_dict(json.loads(json.dumps(sp.to_dict()))) == sp  # sweep.json round trip


# --------------------------------------------------------------------------------------------
# Entry points refuse before anything runs
# --------------------------------------------------------------------------------------------


def test_cli_and_job_entry_point_refuse_asha_in_private_mode(capsys):
    import importlib.util
    from pathlib import Path

    from dpfeta import cli

    args = ["--config", "configs/digits.yaml", "--set", "tune.scheduler=asha"]
    assert cli.main(["tune", *args]) == 2
    assert "fifo" in capsys.readouterr().err
    path = Path(__file__).resolve().parents[1] / "ray_jobs" / "tune.py"
    spec = importlib.util.spec_from_file_location("ray_jobs_tune", path)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert job.main(args) == 2  # the job entry point is the CLI: the same refusal, the same exit code
    assert "tune.scheduler" in capsys.readouterr().err


def test_trial_sigma_covers_batch_size_and_epochs_in_the_search_space():
    """(q, T) move with the trial: each trial's own curve (central + DP-SGD at its q and T + M3) must
    stay under the reference at every order, so the sweep's total holds for every draw."""
    space = {
        "finetune.batch_size": {"type": "choice", "values": [32, 64, 128]},
        "finetune.epochs": {"type": "uniform", "lower": 0.5, "upper": 2.0},
        "central.rounds": {"type": "randint", "lower": 1, "upper": 3},
    }
    cfg = privacy.resolve(_cfg(space=space), DIGITS_N)
    sp = tune.plan_sweep(cfg, DIGITS_N)
    ref, t = sp.to_dict()["reference"], cfg.tune
    bound = np.asarray(ref["rdp"])
    sigmas = []
    for batch, epochs, rounds in [(32, 0.5, 1), (32, 2.0, 2), (64, 1.0, 1), (128, 0.5, 2), (128, 2.0, 2)]:
        trial_cfg = config.replace(
            cfg, {"finetune.batch_size": batch, "finetune.epochs": epochs, "central.rounds": rounds}
        )
        sigma = ptrial.trial_noise_multiplier(sp, trial_cfg, DIGITS_N)
        q = batch / DIGITS_N
        steps = math.ceil(epochs / q - 1e-9)
        event = _trial_event(rounds, 2.0, 100 / DIGITS_N, sigma, q, steps, t.score_noise)
        acc = rdp.RdpAccountant(list(ref["orders"]))
        acc.compose(event)
        assert np.all(acc.rdp <= bound * (1 + 1e-9) + 1e-12), (batch, epochs, rounds)
        assert _rdp_epsilon(dp_event.RepeatAndSelectDpEvent(event, t.num_trials, t.tnb_eta)) <= cfg.privacy.epsilon
        plan = ptrial.trial_plan(sp, trial_cfg, DIGITS_N, sigma)
        assert (plan.sample_rate, plan.steps) == (pytest.approx(q), steps)
        sigmas.append(sigma)
    # more steps at the same q need more noise: the trials really got their own sigma
    assert sigmas[1] > sigmas[0] and sigmas[4] > sigmas[3]


def test_search_seed_is_a_secret_and_the_old_key_is_refused():
    """The draws replayed from tune.search_seed would name the selected trial's index in the release (audit r3
    M1): it is redacted like run.seed wherever the config is published, and kept only in sweep.json."""
    cfg = _cfg("tune.search_seed=7", "run.dir=/secret/place", "tracking.uri=http://user:pw@mlflow.internal")
    assert cfg.tune.search_seed == 7
    for public in (cfg.public_flat(), {f"{s}.{k}": v for s, d in cfg.public_dict().items() for k, v in d.items()}):
        for key in ("tune.search_seed", "run.dir", "tracking.uri"):
            assert public[key] == config.SEED_REDACTED, key
    assert _cfg().public_flat()["tune.search_seed"] is None  # unset: nothing to hide
    with pytest.raises(ValueError, match="tune.search_seed"):
        _cfg("tune.seed=1")


def test_the_trials_are_drawn_once_every_grid_combination_equally_often():
    """sweep.json's trial list: K entries, each grid combination K / grid times, random keys within
    their bounds, the same list for the same public search_seed (a resume runs exactly these)."""
    from dpfeta.tune.space import draw_trials

    space = {
        "warmup.steps": {"type": "grid", "values": [100, 200]},
        "central.rounds": {"type": "randint", "lower": 1, "upper": 4},
        "finetune.lr": {"type": "loguniform", "lower": 1e-4, "upper": 1e-2},
    }
    trials = draw_trials(space, 6, seed=7)
    assert [t["index"] for t in trials] == list(range(6))
    assert sorted(t["params"]["warmup.steps"] for t in trials) == [100, 100, 100, 200, 200, 200]
    assert all(1 <= t["params"]["central.rounds"] < 4 and 1e-4 <= t["params"]["finetune.lr"] <= 1e-2 for t in trials)
    assert len({t["params"]["finetune.lr"] for t in trials}) == 6  # fresh draws per trial
    assert draw_trials(space, 6, seed=7) == trials and draw_trials(space, 6, seed=8) != trials
    assert json.loads(json.dumps(trials)) == trials  # plain JSON values (stored in sweep.json)
    assert draw_trials({}, 3, seed=None) == [{"index": i, "params": {}} for i in range(3)]


def test_a_sweep_stored_before_tune_central_resumes_with_its_query_per_trial(tmp_path):
    """sweep.json written by a version without tune.central: the same command resumes it (the key is
    at its default now) under the stored plan, whose trials keep their own query; a changed key is refused."""
    from dpfeta.storage import Workspace
    from dpfeta.tune import sweep as tsweep

    cfg = privacy.resolve(
        _cfg(f"run.dir={tmp_path}", "run.name=old", space={"warmup.steps": {"type": "choice", "values": [2, 4]}}),
        DIGITS_N,
    )
    ws = Workspace(cfg.run_location())
    state = tsweep.load_state(cfg, DIGITS_N, ws)
    assert state["plan"]["central"] == "shared"
    path = ws.path(tune.SWEEP_FILE)
    old = json.loads(path.read_text())
    del old["config"]["tune"]["central"]
    old["plan"] = tune.plan_sweep(config.replace(cfg, {"tune.central": "per_trial"}), DIGITS_N).to_dict()
    del old["plan"]["central"]
    path.write_text(json.dumps(old))
    resumed = tsweep.load_state(cfg, DIGITS_N, ws)
    assert resumed["plan"] == old["plan"] and "central" not in resumed["plan"]
    stored = psweep.SweepPlan.from_dict(resumed["plan"])
    sigma = ptrial.trial_noise_multiplier(stored, cfg, DIGITS_N)
    ledger = ptrial.trial_plan(stored, cfg, DIGITS_N, sigma).ledger
    assert not ledger.get("central").shared and ledger.get("central").taken == 0
    with pytest.raises(ValueError, match="different config"):
        tsweep.load_state(config.replace(cfg, {"tune.central": "shared"}), DIGITS_N, ws)
    with pytest.raises(ValueError, match="different config"):
        tsweep.load_state(config.replace(cfg, {"tune.score_noise": 11.0}), DIGITS_N, ws)


def test_a_sweep_card_says_the_shared_query_ran_once_and_counts_image_folders(tmp_path):
    from dpfeta import release

    ledger = privacy.Ledger(accountant="rdp", delta=1e-5, n=DIGITS_N, repeat={"mean": 2.0, "shape": 1.0})
    ledger.add("central", noise_multiplier=4.8, sample_rate=0.95, count=1, taken=1, shared=True)
    ledger.add("dpsgd", noise_multiplier=30.0, sample_rate=0.2, count=50, taken=50)
    ledger.add("selection", noise_multiplier=30.0, kind="gaussian", count=1, taken=1)
    for i in range(30):
        path = release.release_dir(tmp_path) / "samples" / "images" / f"{i % 3:06d}" / f"{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"png")
    rec = release.record(tmp_path, kind="sweep", ledger=ledger, public_config={"a": 1})
    assert [m["shared"] for m in rec["mechanisms"]] == [True, False, False]
    assert len([f for f in rec["files"] if f.startswith("samples/images/")]) == 30  # the record keeps every name
    card = (release.release_dir(tmp_path) / release.CARD_FILE).read_text()
    assert "| central (once, before the trials: shared) | 4.8000 |" in card
    assert "| dpsgd (the selected trial's) |" in card
    assert "samples/images/... (30 files)" in card and "000007.png" not in card
    # the stated total is the ledger's: the query once, then the repeat of the trial's mechanisms
    alone = _rdp_epsilon(
        dp_event.ComposedDpEvent(
            [
                _poisson_gaussian(0.95, 4.8, 1),
                dp_event.RepeatAndSelectDpEvent(
                    dp_event.ComposedDpEvent([_poisson_gaussian(0.2, 30.0, 50), dp_event.GaussianDpEvent(30.0)]),
                    2.0,
                    1.0,
                ),
            ]
        )
    )
    assert ledger.epsilon() == pytest.approx(alone, rel=1e-9)


def test_evaluate_states_a_sweep_release_total_not_the_selected_trial_ledger(tmp_path):
    """A sweep's release/: its ledger is the selected trial's (whose own curve may be below the
    sweep's reference), the total it states is the sweep's; dpfeta evaluate reports the latter."""
    from dpfeta import evaluate, release

    ledger = privacy.Ledger(accountant="rdp", delta=1e-5, n=DIGITS_N, repeat={"mean": 2.0, "shape": 1.0})
    ledger.add("dpsgd", noise_multiplier=30.0, sample_rate=0.2, count=10, taken=10)
    own = ledger.epsilon()
    release.record(tmp_path, kind="sweep", ledger=ledger, public_config={}, epsilon=own + 0.25)
    samples = release.release_dir(tmp_path) / "samples"
    samples.mkdir()
    stated = evaluate.stated_privacy(config.Config(), samples)
    assert stated["epsilon"] == pytest.approx(own + 0.25) and stated["epsilon_source"].endswith("release.json")
    run_dir = tmp_path / "run"  # a run directory: its ledger's epsilon
    (run_dir / "samples").mkdir(parents=True)
    ledger.save(run_dir / "ledger.json")
    assert evaluate.stated_privacy(config.Config(), run_dir / "samples")["epsilon"] == pytest.approx(own)
    assert evaluate.stated_privacy(config.Config(), tmp_path)["epsilon"] is None
