"""The search space: ``tune.search_space`` (YAML) validated against the config schema and the tuning
privacy mode, probed for type errors before any trial runs, and turned into Ray Tune domains."""

from __future__ import annotations

import math
from typing import Any

from dpfeta import config as config_mod
from dpfeta.privacy.trial import PRIVACY_KEYS, extremes

# Keys a search space may not touch: the budget, the sweep itself, the run identity, the data (N and
# the split are public facts of the plan) and the score's definition.
FORBIDDEN_PREFIXES = ("privacy.", "tune.", "run.", "tracking.", "data.", "eval.")


FORBIDDEN_KEYS = ("central.epsilon_share",)  # sigma_c is resolved once, before the sweep


SPACE_TYPES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "uniform": (("lower", "upper"), ()),
    "quniform": (("lower", "upper", "q"), ()),
    "loguniform": (("lower", "upper"), ("base",)),
    "qloguniform": (("lower", "upper", "q"), ("base",)),
    "randint": (("lower", "upper"), ()),  # upper exclusive (Ray)
    "qrandint": (("lower", "upper", "q"), ()),
    "lograndint": (("lower", "upper"), ("base",)),  # upper exclusive (Ray)
    "randn": (("mean", "sd"), ()),
    "choice": (("values",), ()),
    "grid": (("values",), ()),
}


BOUNDED = {"uniform", "quniform", "loguniform", "qloguniform", "randint", "qrandint", "lograndint", "choice", "grid"}


def _space_error(key: str, expected: str, got: Any) -> ValueError:
    return ValueError(f"config key 'tune.search_space.{key}': expected {expected}, got {got!r}")


def check_search_space(cfg: config_mod.Config) -> dict[str, dict]:
    """Validate ``tune.search_space`` against the config schema and the privacy mode; return it."""
    space, mode = cfg.tune.search_space, cfg.tune.privacy_mode
    for key, spec in space.items():
        if key.startswith(FORBIDDEN_PREFIXES) or key in FORBIDDEN_KEYS:
            raise _space_error(
                key,
                "a key outside "
                + ", ".join(FORBIDDEN_PREFIXES + FORBIDDEN_KEYS)
                + " (the budget, data and score are fixed for a sweep)",
                key,
            )
        if not isinstance(spec, dict) or spec.get("type") not in SPACE_TYPES:
            raise _space_error(key, "a mapping with type one of " + ", ".join(SPACE_TYPES), spec)
        required, optional = SPACE_TYPES[spec["type"]]
        missing = [f for f in required if f not in spec]
        unknown = sorted(set(spec) - set(required) - set(optional) - {"type"})
        if missing or unknown:
            raise _space_error(key, f"fields {list(required)} for type {spec['type']}", spec)
        if spec["type"] in ("choice", "grid"):
            if not isinstance(spec["values"], list) or not spec["values"]:
                raise _space_error(key, "a non-empty list of values", spec["values"])
        elif "lower" in spec and not spec["lower"] < spec["upper"]:
            raise _space_error(key, "lower < upper", spec)
        if spec["type"] == "grid" and mode == "private":
            raise _space_error(
                key,
                "random distributions in tune.privacy_mode=private (a grid is not "
                "an i.i.d. draw; the Papernot-Steinke bound needs one)",
                spec,
            )
        if key in PRIVACY_KEYS and spec["type"] not in BOUNDED:
            raise _space_error(key, f"a bounded distribution for the privacy parameter {key}", spec)
    _check_samples(cfg, space)
    return space


def _check_samples(cfg: config_mod.Config, space: dict) -> None:
    """Values the space can produce must make a valid config (type errors caught before any trial)."""
    probes = {key: _probe_values(spec) for key, spec in space.items()}
    for i in range(max(len(v) for v in probes.values()) if probes else 0):
        config_mod.replace(cfg, {key: values[i % len(values)] for key, values in probes.items()})


def _probe_values(spec: dict) -> list:
    t = spec["type"]
    if t in ("choice", "grid"):
        return list(spec["values"])
    if t == "randn":
        return [spec["mean"], spec["mean"] + spec["sd"]]
    lower, upper = extremes(spec)
    if t in ("uniform", "loguniform"):  # a float draw: also probe a non-integer value
        return [lower, upper, lower + (upper - lower) / math.pi]
    return [lower, upper]


def search_space(space: dict) -> dict[str, Any]:
    """``{dotted key: ray.tune domain}`` from the YAML form of ``tune.search_space``."""
    from ray import tune

    out = {}
    for key, spec in space.items():
        t = spec["type"]
        kw = {k: v for k, v in spec.items() if k != "type"}
        if t == "choice":
            out[key] = tune.choice(kw["values"])
        elif t == "grid":
            out[key] = tune.grid_search(kw["values"])
        else:
            out[key] = getattr(tune, t)(**kw)
    return out


def draw_trials(space: dict, num_trials: int, seed) -> list[dict]:
    """The sweep's ``num_trials`` hyperparameter sets, drawn once before any trial runs and stored in
    ``sweep.json`` (so a resumed sweep runs exactly these, whatever Ray Tune's own state says): every
    grid combination ``num_trials / grid size`` times, each with fresh draws of the random keys.
    Data-independent; ``seed`` (``tune.search_seed``, secret: redacted like run.seed) orders the draws;
    None: OS entropy."""
    import itertools

    import numpy as np

    domains = search_space(space)
    grid_keys = [k for k, spec in space.items() if spec["type"] == "grid"]
    combos = list(itertools.product(*(space[k]["values"] for k in grid_keys)))
    rng = np.random.default_rng(seed)
    trials = []
    for _ in range(num_trials // len(combos)):
        for combo in combos:
            fixed = dict(zip(grid_keys, combo))
            params = {k: fixed[k] if k in fixed else domains[k].sample(random_state=rng) for k in space}
            trials.append({"index": len(trials), "params": params})
    return trials


def _metric_mode(metric: str) -> str:
    return "min" if any(word in metric for word in ("fid", "loss", "error")) else "max"
