"""All privacy accounting of dpfeta, written once (docs/privacy.md is the contract it implements).

* ``events``     -- the mechanisms M1 (central query), M2 (DP-SGD), M3 (selection score) as DpEvents;
* ``accounting`` -- RDP order grids, the cached RDP curve, epsilon(delta), the sigma searches;
* ``ledger``     -- ``Mechanism``/``Ledger``: planned and taken counts, the composed epsilon, the
  resume guard (``check_resume``);
* ``curve``      -- the composed epsilon at each report step, computed off the step path;
* ``auto``       -- ``central.rounds``/``epsilon_share: auto``: the central query's rounds and share from public facts;
* ``plan``       -- one run's plan: sigma calibrated once so that M1 + M2 meet the target;
* ``sweep``      -- a sweep's plan (``SweepPlan``): trial count, the reference curve calibrated to the total;
* ``trial``      -- a sweep trial: its privacy parameters, the reference trial, its noise multiplier and plan;
* ``repeat``     -- repeat and select: the random trial count K, the DP selection score.

Imports neither torch, Ray, nor dpfeta's data, pipeline or tracking (``tests/test_layers.py``).
"""

from dpfeta.privacy.accounting import (
    DEFAULT_RDP_ORDERS,
    INTEGER_RDP_ORDERS,
    PLD_COARSE_INTERVAL,
    PLD_INTERVAL,
    calibrate_noise,
    curve_epsilon,
    epsilon_of,
    make_accountant,
    quiet_accountant,
    rdp_curve,
    repeat_curve,
    search_sigma,
    smallest_sigma,
    tnb_gamma,
)
from dpfeta.privacy.auto import AUTO, CentralChoice, choose_central, pixel_std
from dpfeta.privacy.curve import EpsilonCurve, epsilon_curve
from dpfeta.privacy.events import (
    KINDS,
    NEIGHBOURING_RELATION,
    PUBLIC_FACTS,
    central_event,
    dpsgd_event,
    poisson_gaussian,
    selection_event,
)
from dpfeta.privacy.ledger import RESUME_KEYS, Ledger, Mechanism, check_resume
from dpfeta.privacy.plan import (
    Plan,
    central_choice,
    central_noise,
    dpsgd_steps,
    plan,
    plan_json,
    plan_table,
    privacy_summary,
    resolve,
)

__all__ = [
    "central_choice",
    "pixel_std",
    "choose_central",
    "CentralChoice",
    "AUTO",
    "DEFAULT_RDP_ORDERS",
    "EpsilonCurve",
    "INTEGER_RDP_ORDERS",
    "KINDS",
    "PLD_COARSE_INTERVAL",
    "PLD_INTERVAL",
    "Ledger",
    "Mechanism",
    "NEIGHBOURING_RELATION",
    "PUBLIC_FACTS",
    "Plan",
    "RESUME_KEYS",
    "calibrate_noise",
    "central_event",
    "central_noise",
    "check_resume",
    "curve_epsilon",
    "dpsgd_event",
    "dpsgd_steps",
    "epsilon_curve",
    "epsilon_of",
    "make_accountant",
    "plan",
    "plan_json",
    "plan_table",
    "poisson_gaussian",
    "privacy_summary",
    "quiet_accountant",
    "rdp_curve",
    "repeat_curve",
    "resolve",
    "search_sigma",
    "selection_event",
    "smallest_sigma",
    "tnb_gamma",
]
