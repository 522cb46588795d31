"""A trial's result: its metrics, the selection score (M3: DP in private and naive mode, exact on a
public proxy) counted in the trial's ledger, and the trial's own epsilon."""

from __future__ import annotations

import zlib

import numpy as np
from dp_accounting import dp_event

from dpfeta import privacy
from dpfeta.privacy.accounting import quiet_accountant
from dpfeta.privacy.repeat import dp_score
from dpfeta.tune.spec import TrialSpec


def score(spec: TrialSpec, plan: privacy.Plan, out: dict, trial_id: str) -> dict:
    """The trial's result: its metrics, the score (DP in private/naive mode) and its epsilon."""
    mode = spec.plan.mode
    result = {k: v for k, v in out.items() if k not in ("correct", "val_size")}
    result["epsilon_total"] = spec.plan.epsilon
    has_count = "correct" in out and "val_size" in out
    if mode == "public":  # the proxy is public: the exact accuracy is free
        if has_count:
            result["score"] = int(out["correct"]) / int(out["val_size"])
        return result
    if not has_count:
        raise ValueError(
            "a trial function must return 'correct' and 'val_size' (the count of correct "
            f"validation predictions and the public validation size), got {sorted(out)}"
        )
    seed = None if spec.seed is None else [spec.seed, zlib.crc32(trial_id.encode())]
    result["score"] = dp_score(
        int(out["correct"]), int(out["val_size"]), sigma_v=spec.plan.score_noise, rng=np.random.default_rng(seed)
    )
    result["val_size"] = int(out["val_size"])  # public (a data-independent rule on the public N), never "correct"
    plan.ledger.record_steps("selection", 1)
    for mech in plan.ledger.mechanisms:  # a stage that did not record its steps: count the whole plan
        if mech.taken == 0:
            plan.ledger.record_steps(mech.name, mech.planned)
    with quiet_accountant():
        result["epsilon_trial"] = privacy.epsilon_of(
            dp_event.ComposedDpEvent([m.event(m.taken) for m in plan.ledger.mechanisms]),
            delta=plan.delta,
            accountant=spec.plan.accountant,
        )
    return result
