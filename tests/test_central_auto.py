"""``central.epsilon_share: auto`` / ``central.rounds: auto``: the rule of ``privacy/auto.py`` from public
facts only, its arithmetic, its monotonicity, and its way through ``privacy.resolve`` into the plan."""

from __future__ import annotations

import pytest

from dpfeta import central, config, privacy
from dpfeta.privacy import auto

DIGITS = dict(n=1258, image_shape=(1, 16, 16), num_classes=10, batch_size=1200, downsample=2, delta=1e-5)
MNIST = dict(n=60000, image_shape=(1, 28, 28), num_classes=10, batch_size=6000, downsample=2, delta=1e-5)


def _choose(facts, epsilon, **kw):
    return auto.choose_central(epsilon=epsilon, accountant="rdp", **facts, **kw)


def _std_at(facts, choice, epsilon):
    """The per-pixel noise std of the central images once sigma_c is calibrated to the chosen share."""
    q_c = min(1.0, facts["batch_size"] / facts["n"])
    sigma = privacy.calibrate_noise(
        make_events=lambda s: privacy.central_event(noise_multiplier=s, sample_rate=q_c, rounds=choice.rounds),
        epsilon=choice.epsilon_share * epsilon,
        delta=facts["delta"],
        accountant="rdp",
        rtol=1e-4,
    )
    return auto.pixel_std(
        sigma,
        image_shape=facts["image_shape"],
        downsample=facts["downsample"],
        batch_size=facts["batch_size"],
        num_classes=facts["num_classes"],
    )


def test_the_sensitivity_is_the_central_query_s():
    assert auto.sensitivity((1, 16, 16), 2) == central.sensitivity((1, 16, 16), 2) == 8.0
    assert auto.pixel_std(2.0, image_shape=(1, 16, 16), downsample=2, batch_size=1200, num_classes=10) == pytest.approx(
        2.0 * 8.0 / 120
    )


@pytest.mark.parametrize(
    "facts, epsilon, rounds, share",
    [
        (DIGITS, 1, 1, 0.8),  # the low-epsilon setting the evidence chose by hand (bench/README.md, quality)
        (DIGITS, 10, 2, 0.28),  # close to the tuned digits setting (2 rounds, 0.3)
        (MNIST, 1, 5, 0.15),
        (MNIST, 10, 5, 0.02),  # the floor: large N, the target costs almost nothing
    ],
)
def test_known_choices(facts, epsilon, rounds, share):
    choice = _choose(facts, epsilon)
    assert (choice.rounds, choice.epsilon_share) == (rounds, share), choice.reason


@pytest.mark.parametrize("facts, epsilon", [(DIGITS, 5), (DIGITS, 10), (MNIST, 1), (MNIST, 2)])
def test_an_uncapped_choice_meets_the_target_and_one_hundredth_less_would_not(facts, epsilon):
    choice = _choose(facts, epsilon)
    assert auto.SHARE_FLOOR < choice.epsilon_share < auto.SHARE_CAP
    assert _std_at(facts, choice, epsilon) <= auto.TARGET_PIXEL_STD * (1 + 1e-3)
    less = auto.CentralChoice(choice.rounds, round(choice.epsilon_share - 0.01, 2), "")
    assert _std_at(facts, less, epsilon) > auto.TARGET_PIXEL_STD


def test_a_capped_choice_says_so_and_keeps_a_fifth_for_dpsgd():
    choice = _choose(DIGITS, 1)
    assert choice.epsilon_share == auto.SHARE_CAP and "capped" in choice.reason
    assert _std_at(DIGITS, choice, 1) > auto.TARGET_PIXEL_STD


def test_more_budget_or_more_data_never_buys_a_larger_share_or_fewer_rounds():
    for facts in (DIGITS, MNIST):
        previous = None
        for epsilon in (0.5, 1, 2, 3, 5, 8, 10, 20):
            choice = _choose(facts, epsilon)
            if previous is not None and choice.rounds == previous.rounds:
                assert choice.epsilon_share <= previous.epsilon_share
            if previous is not None:
                assert choice.rounds >= previous.rounds
            previous = choice
    small, large = _choose(DIGITS, 5), _choose({**DIGITS, "n": 12580, "batch_size": 12000}, 5)
    assert large.rounds >= small.rounds and large.epsilon_share <= small.epsilon_share


def test_one_key_fixed_the_other_follows():
    assert _choose(DIGITS, 10, rounds=1).epsilon_share == 0.19  # one round: 2/3 of what two need (0.28)
    assert _choose(DIGITS, 10, epsilon_share=0.3).rounds == 2
    assert _choose(DIGITS, 10, epsilon_share=0.5).rounds == auto.MAX_ROUNDS  # the most rounds within the share
    low = _choose(DIGITS, 1, epsilon_share=0.5)
    assert low.rounds == 1 and "misses" in low.reason
    with pytest.raises(ValueError, match="nothing to choose"):
        _choose(DIGITS, 10, rounds=2, epsilon_share=0.3)


def test_resolve_fixes_auto_from_the_config_alone(tmp_path):
    cfg = config.load(
        "configs/digits.yaml",
        ["central.epsilon_share=auto", "central.rounds=auto", "central.noise_multiplier=null", "privacy.epsilon=10"],
    )
    assert cfg.central.epsilon_share == "auto" and cfg.central.rounds == "auto"
    resolved = privacy.resolve(cfg, 1258)
    assert (resolved.central.rounds, resolved.central.epsilon_share) == (2, 0.28)
    assert isinstance(resolved.central.noise_multiplier, float)
    # the same public facts give the same choice whatever the data (the rule reads none)
    assert privacy.resolve(config.replace(cfg, {"data.path": str(tmp_path / "nothing-here")}), 1258) == config.replace(
        resolved, {"data.path": str(tmp_path / "nothing-here")}
    )
    pl = privacy.plan(cfg, 1258)  # plan() resolves an unresolved config itself
    assert pl.ledger.get("central").planned == 2 and pl.epsilon <= 10


def test_a_fixed_central_noise_fixes_the_std_and_auto_picks_the_rounds_for_it():
    # sigma_c = 2.25 is the target's own sigma on digits: the same rounds as the calibrated rule at eps = 10
    fixed = _choose(DIGITS, 10, noise_multiplier=2.25)
    assert fixed.rounds == _choose(DIGITS, 10).rounds == 2 and "fixed" in fixed.reason
    assert _choose(DIGITS, 10, noise_multiplier=20.0).rounds == auto.MAX_ROUNDS  # cheap rounds: all of them
    cfg = config.load("configs/digits.yaml", ["central.noise_multiplier=20.0"])  # share: auto, unused
    resolved = privacy.resolve(cfg, 1258)
    assert resolved.central.noise_multiplier == 20.0 and resolved.central.rounds == auto.MAX_ROUNDS


def test_the_central_query_resolves_auto_itself_from_the_public_n():
    from dpfeta import data

    cfg = config.load(
        None,
        [
            "central.rounds=auto",
            "central.epsilon_share=auto",
            "central.noise_multiplier=null",
            "finetune.batch_size=256",
        ],
    )
    train = data.load_splits(cfg).train
    result = central.central_images(cfg, train, generator=__import__("torch").Generator().manual_seed(0))
    choice = privacy.central_choice(cfg, len(train))
    assert result.rounds == choice.rounds and len(result.labels) == choice.rounds * cfg.data.num_classes
    assert result.noise_multiplier == pytest.approx(privacy.resolve(cfg, len(train)).central.noise_multiplier)
