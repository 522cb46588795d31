"""``dpfeta audit``: an empirical lower bound on epsilon from one extra DP-SGD run with canaries.

The audit plans exactly like ``dpfeta run`` (sigma, q, T, C of the config), adds m gradient canaries
(``dpfeta.canaries``), each included with probability 1/2 from OS entropy, and runs the DP-SGD stage on
Ray Train from a fresh network (the canary block does not depend on the network). The canary scores
give two lower bounds (``dpfeta.privacy.audit``: Steinke et al. 2023; Mahloujifar et al. 2025) at 95 %
confidence; a correct build stays at or below the ledger's DP-SGD epsilon, a broken one goes above.

An audit run is operator-internal and never a release: it writes ``<run.dir>/<run.name>-audit/nondp/``
(report, score histogram, its own training folder, started afresh each time) and logs to MLflow under
``nondp/`` only. The inclusion bits live in memory only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from dpfeta import audit_plot, checkpoint
from dpfeta import canaries as canary_mod
from dpfeta import config as config_mod
from dpfeta.config import Config
from dpfeta.privacy import audit as estimators

log = logging.getLogger(__name__)

MODES = ("gradient",)
CONFIDENCE = 0.95


def check_request(*, canaries, mode: str) -> None:
    """Refuse a bad request before any work."""
    if isinstance(canaries, bool) or not isinstance(canaries, int) or canaries < 2:
        raise ValueError(f"--canaries: expected an integer m >= 2 (m/2 included on average), got {canaries!r}")
    if mode == "input":
        raise ValueError(
            "--mode input (black-box input canaries: mislabelled images scored by the final model's "
            "denoising loss) is not implemented yet; use --mode gradient (white-box gradient canaries)"
        )
    if mode not in MODES:
        raise ValueError(f"--mode: expected one of {', '.join(MODES)}, got {mode!r}")


def audit_dir(cfg: Config) -> Path:
    """``<run.dir>/<run.name>-audit``: beside the run, never inside its release."""
    return cfg.run_dir().with_name(cfg.run.name + "-audit")


def linear_mu(*, noise_multiplier: float, sample_rate: float, steps: int) -> float:
    """The separation q sqrt(T) / sigma of the summed-projection score in the Gaussian (CLT) approximation
    of a correct build (shared/reference/auditing.md §4). Not a ceiling: a canary is sampled k ~ Bin(T, q)
    times, and the top-r guesses use the tail of k (digits at eps 10: 1.79 / 2.47 measured, 1.40 / 2.00
    from this mu; bench/README.md)."""
    return math.inf if noise_multiplier == 0 else sample_rate * math.sqrt(steps) / noise_multiplier


def bounds(
    scores: np.ndarray, included: np.ndarray, *, delta: float, significance: float = 1 - CONFIDENCE
) -> dict[str, estimators.Bound]:
    """Both one-run estimators on the scores of included and excluded canaries."""
    ins, outs = scores[included], scores[~included]
    return {
        "one_run": estimators.epsilon_one_run(ins, outs, significance=significance, delta=delta),
        "fdp": estimators.epsilon_one_run_fdp(ins, outs, significance=significance, delta=delta),
    }


def ceiling(canaries: int, delta: float) -> dict[str, float]:
    """The largest epsilon_lb m canaries can give at all (every canary's membership guessed right): a
    violation above it cannot be shown (at delta 1e-5: m = 1,000 -> 4.75 one-run, 8.49 f-DP;
    m = 4,000 -> 5.99, 10.56)."""
    return estimators.ideal_bounds(PERFECT_MU, canaries=canaries, delta=delta)


PERFECT_MU = 50.0  # a separation at which ideal scores never overlap


def run_audit(
    cfg: Config,
    *,
    canaries: int = 1000,
    mode: str = "gradient",
    seed: Optional[int] = None,
    out_dir: Path | str | None = None,
    echo: Callable[[str], None] = print,
    dp_step: Optional[type] = None,
    sampler: Optional[type] = None,
    base=None,
) -> dict:
    """Plan, run DP-SGD with canaries on Ray Train, estimate, report; returns the report (audit.json).

    ``seed``: the inclusion bits' seed (tests); None = OS entropy. ``dp_step``/``sampler``: broken builds
    of the mutation tests, ``base``: a stand-in for the EDM task (tests and bench only).
    """
    check_request(canaries=canaries, mode=mode)
    from dpfeta import cluster, data, distributed, pipeline, tracking

    pl = pipeline.plan_run(cfg)
    echo(pipeline.budget_text(cfg, pl))
    acfg = config_mod.replace(cfg, {"run.name": cfg.run.name + "-audit"})
    out = Path(out_dir).expanduser().resolve() if out_dir is not None else audit_dir(cfg)
    nondp = out / "nondp"
    shutil.rmtree(nondp / "train", ignore_errors=True)  # new bits, new run: never resume an old audit
    nondp.mkdir(parents=True, exist_ok=True)

    train, _ = pipeline.read_data(cfg, pl)
    if not isinstance(train, data.ImageSet):
        raise ValueError(
            "dpfeta audit: expected an in-memory data source (not data.source=parquet from "
            "'dpfeta prepare'); audit with the same config's original source"
        )
    rng = np.random.default_rng(seed)  # None: OS entropy
    included = rng.random(canaries) < 0.5
    train = canary_mod.with_canaries(train, canary_mod.canary_records(cfg, included), rng)
    plan = dataclasses.replace(pl, n=pl.n + canaries, expected_batch=pl.sample_rate * (pl.n + canaries))
    task = canary_mod.canary_task(
        canaries=canaries, dp_step=dp_step, sampler=sampler, **({"base": base} if base is not None else {})
    )

    start = time.perf_counter()
    try:
        distributed.fit_finetune(acfg, train=train, plan=plan, init_dir=None, out_dir=nondp / "train", task=task)
    finally:
        cluster.shutdown()  # a local Ray this process started
    seconds = time.perf_counter() - start
    state = checkpoint.load(nondp / "train" / "checkpoint")
    scores = state["model"]["scores"].double().numpy()

    eps_sgd = pl.ledger.per_mechanism(planned=True)["dpsgd"]
    found = bounds(scores, included, delta=pl.delta)
    mu = linear_mu(noise_multiplier=pl.noise_multiplier, sample_rate=pl.sample_rate, steps=pl.steps)
    report = {
        "mode": mode,
        "canaries": canaries,
        "included": int(included.sum()),
        "confidence": CONFIDENCE,
        "delta": pl.delta,
        "accountant": pl.accountant,
        "epsilon_ledger": pl.epsilon,
        "epsilon_dpsgd": eps_sgd,
        "noise_multiplier": pl.noise_multiplier,
        "sample_rate": pl.sample_rate,
        "steps": pl.steps,
        "max_grad_norm": cfg.finetune.max_grad_norm,
        "workers": cfg.run.num_workers,
        "bounds": {name: b.to_dict() for name, b in found.items()},
        "epsilon_lb": max(b.epsilon for b in found.values()),
        "auroc": estimators.auroc(scores[included], scores[~included]),
        "ideal_mu": mu,
        "ideal": estimators.ideal_bounds(mu, canaries=canaries, delta=pl.delta) if mu < 50 else None,
        "ceiling": ceiling(canaries, pl.delta),
        "seconds": round(seconds, 1),
        "build": "correct" if dp_step is None and sampler is None else "mutant",
    }
    report["violation"] = report["epsilon_lb"] > eps_sgd
    (nondp / "audit.json").write_text(json.dumps(report, indent=2) + "\n")
    png = audit_plot.score_histogram(
        scores[included],
        scores[~included],
        nondp / "audit_scores.png",
        title=f"canary scores: {int(included.sum())} in, {int((~included).sum())} out",
    )
    _log_mlflow(acfg, out, report, png, tracking)
    echo(report_text(report))
    return report


def _log_mlflow(cfg: Config, out: Path, report: dict, png: Path, tracking) -> None:
    """The audit's own MLflow run: metrics and the histogram under nondp/ only (nothing in release mode)."""
    tracker = tracking.start_run(cfg, out, tags={"dpfeta.audit": report["mode"]})
    if tracker is None:
        return
    try:
        metrics = {
            "epsilon_ledger": report["epsilon_ledger"],
            "epsilon_dpsgd": report["epsilon_dpsgd"],
            "canaries": report["canaries"],
            "auroc": report["auroc"],
        }
        for name, b in report["bounds"].items():
            metrics.update(
                {f"epsilon_lb_{name}": b["epsilon"], f"guesses_{name}": b["guesses"], f"correct_{name}": b["correct"]}
            )
        tracker.log_nondp_metrics({f"nondp/audit/{k}": v for k, v in metrics.items()})
        tracker.log_artifact(png, "audit")
        tracker.log_artifact(out / "nondp" / "audit.json", "audit")
    finally:
        tracker.end()


def report_text(r: dict) -> str:
    """What ``dpfeta audit`` prints."""
    lines = [
        f"audit ({r['mode']} canaries, {r['build']} build): m={r['canaries']} ({r['included']} included), "
        f"sigma={r['noise_multiplier']:.4f} q={r['sample_rate']:.5g} T={r['steps']} C={r['max_grad_norm']:g}, "
        f"{r['workers']} worker(s), {r['seconds']:.0f}s",
        f"ledger epsilon {r['epsilon_ledger']:.4f} (whole run), DP-SGD alone {r['epsilon_dpsgd']:.4f} "
        f"(delta {r['delta']:g}, {r['accountant']})",
    ]
    for name, label in (("one_run", "one-run (Steinke et al. 2023)"), ("fdp", "f-DP (Mahloujifar et al. 2025)")):
        b = r["bounds"][name]
        ideal = f"; a correct build's Gaussian (mu-GDP) figure: ~{r['ideal'][name]:.2f}" if r.get("ideal") else ""
        lines.append(
            f"epsilon_lb {b['epsilon']:.4f}  {label}, {r['confidence']:.0%} confidence, "
            f"r={b['guesses']} guesses ({b['correct']} correct){ideal}"
        )
    verdict = (
        f"VIOLATION: epsilon_lb {r['epsilon_lb']:.4f} > the DP-SGD epsilon {r['epsilon_dpsgd']:.4f}: "
        "the implementation does not deliver the epsilon it reports"
        if r["violation"]
        else f"consistent: epsilon_lb {r['epsilon_lb']:.4f} <= the DP-SGD epsilon {r['epsilon_dpsgd']:.4f} "
        "(a lower bound; far below is expected, near the Gaussian figure)"
    )
    lines += [f"AUROC {r['auroc']:.4f}", verdict]
    top = r.get("ceiling")
    if top and not r["violation"] and max(top.values()) <= r["epsilon_dpsgd"]:
        lines.append(
            f"note: {r['canaries']} canaries can show at most epsilon_lb {max(top.values()):.2f} (every "
            f"guess right), below {r['epsilon_dpsgd']:.4f}: no violation could be seen; audit with more "
            "--canaries (the ceiling grows with m)"
        )
    return "\n".join(lines)
