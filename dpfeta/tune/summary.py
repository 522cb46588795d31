"""What a sweep writes when it ends: the operator's ``summary.json`` and ``trials.csv``, the release
(``release/``: the selected trial's outputs, the card, ``selection.json``), the MLflow sweep run."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Optional

from dpfeta import config as config_mod
from dpfeta import privacy
from dpfeta.privacy.sweep import SweepPlan, sweep_plan_json
from dpfeta.storage import Storage, Workspace
from dpfeta.tune.space import _metric_mode

log = logging.getLogger(__name__)

SWEEP_FILE, SUMMARY_FILE, TRIALS_FILE = "sweep.json", "summary.json", "trials.csv"


def _rows(ws: Workspace, spec, trials: list[dict], grid, metric: str) -> list[dict]:
    """One row per trial of sweep.json: a scored trial from its stored result (whichever Tune run
    scored it), any other from this Tune run's outcome (an error, or stopped by the scheduler)."""
    from dpfeta.tune.spec import trial_id
    from dpfeta.tune.trial import RESULT_FILE

    outcome = {}
    for result in grid or []:
        index = ((result.config or {}).get("trial") or {}).get("index")
        if index is not None:
            outcome[int(index)] = result
    rows = []
    for trial in trials:
        tid = trial_id(spec, trial)
        where = f"trials/{tid}/{RESULT_FILE}"
        result = outcome.get(int(trial["index"]))
        if ws.remote.is_file(where):
            m, error = ws.remote.read_json(where), False
        else:
            m, error = (result.metrics or {}) if result is not None else {}, result is None or bool(result.error)
        rows.append(
            {
                "trial_id": tid,
                "params": dict(trial["params"]),
                "score": m.get(metric),
                "sigma": m.get("sigma"),
                "epsilon_trial": m.get("epsilon_trial"),
                "val_size": m.get("val_size"),
                "status": "done" if m.get("trial_done") else ("error" if error else "stopped"),
            }
        )
    return sorted(rows, key=lambda r: r["trial_id"])


def _best(rows: list[dict], metric: str) -> Optional[dict]:
    """Best finished trial; failed or stopped trials are never selected (their score counts as -inf)."""
    done = [
        r for r in rows if r["status"] == "done" and isinstance(r["score"], (int, float)) and math.isfinite(r["score"])
    ]
    if not done:
        return None
    sign = 1.0 if _metric_mode(metric) == "max" else -1.0
    return max(done, key=lambda r: sign * r["score"])


def _write_trials_csv(rows: list[dict], path: Path) -> None:
    import csv

    keys = sorted({k for r in rows for k in r["params"]})
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial_id", *keys, "sigma", "score", "epsilon_trial", "status"])
        for r in rows:
            w.writerow(
                [
                    r["trial_id"],
                    *(r["params"].get(k) for k in keys),
                    r["sigma"],
                    r["score"],
                    r["epsilon_trial"],
                    r["status"],
                ]
            )


def _plan_params(plan: SweepPlan) -> dict:
    """The sweep's MLflow params (published names: ``sweep.trial_sigma``, ``sweep.single_sigma``)."""
    d = plan.to_dict()
    keys = ("mode", "accountant", "epsilon", "trial_sigma", "single_sigma", "penalty", "score_noise")
    out = {f"sweep.{k}": d.get(k) for k in keys if k in d}
    out["sweep.trials"] = json.dumps(plan.trials, sort_keys=True)
    return out


def _summarize(cfg: config_mod.Config, state: dict, rows: list[dict], ws: Workspace) -> dict:
    plan = SweepPlan.from_dict(state["plan"])
    best = _best(rows, cfg.tune.metric)
    if best is not None:
        best = {**best, "dir": ws.url(f"trials/{best['trial_id']}")}
    return {
        "name": cfg.run.name,
        "dir": ws.url(),
        "mode": plan.mode,
        "epsilon": plan.epsilon,
        "delta": plan.delta,
        "accountant": plan.accountant,
        "target_epsilon": plan.target_epsilon,
        "metric": cfg.tune.metric,
        "num_trials": state["num_trials"],
        "seeded": state["seeded"],
        "best": best,
        "trials": rows,
        "plan": sweep_plan_json(plan),
    }


NOTES = {
    "private": "only the selected trial (its central images, model, samples, hyperparameters and noisy score) is "
    "covered by epsilon (repeat-and-select over a random number of trials); the other trials, their "
    "scores, the number of trials and the selected trial's position are not released",
    "naive": "every trial's output is covered (k trials composed); this folder holds the selected trial's",
    "public": "the trials ran on a public proxy; epsilon is the final run's on the sensitive data",
}


SHARED_NOTE = (
    "the central images are shared by every trial: one query, run by the sweep before its trials "
    "and released with them; epsilon counts it once, composed with the trials'"
)


def release_view(summary: dict) -> dict:
    """The selection facts a sweep releases: the selected trial's opaque id, hyperparameters, score
    and sigma (private: nothing about the other trials, nor K, nor the position)."""
    best = summary["best"]
    shared = summary.get("plan", {}).get("central") == "shared"
    nothing = (
        ""
        if best is not None or summary["mode"] == "public"
        else (
            "; no trial finished: only the shared central images are released"
            if shared
            else "; no trial finished, nothing is released"
        )
    )
    out = {
        "mode": summary["mode"],
        "metric": summary["metric"],
        "target_epsilon": summary["target_epsilon"],
        "selected": None
        if best is None
        else {
            "id": best["trial_id"],
            "params": best["params"],
            "score": best["score"],
            "noise_multiplier": best["sigma"],
        },
        "note": NOTES[summary["mode"]] + nothing + (f"; {SHARED_NOTE}" if shared else ""),
    }
    if "final" in summary:
        out["final"] = {"noise_multiplier": summary["final"]["sigma"]}
    return out


def summary_text(summary: dict) -> str:
    """The operator's console summary. Private mode leaves K out (stdout ends up in Ray job logs)."""
    best = summary["best"]
    count = "" if summary["mode"] == "private" else f": {summary['num_trials']} trial(s) run"
    lines = [
        f"dpfeta tune '{summary['name']}' ({summary['mode']}){count}",
        f"  epsilon   {summary['epsilon']:.4f} for the release (target {summary['target_epsilon']:g}, "
        f"delta {summary['delta']:g}, {summary['accountant']}; the whole sweep, selection included)",
    ]
    if best is None:
        lines.append("  selected  none (no trial finished): nothing is released")
    else:
        lines.append(
            f"  selected  {best['trial_id']}: {summary['metric']} {best['score']:.4f}, sigma "
            f"{best['sigma']:.4f}, {json.dumps(best['params'], sort_keys=True)}"
        )
    if "final" in summary:
        lines.append(f"  final     {summary['final']['dir']} (sigma {summary['final']['sigma']:.4f})")
    lines.append(
        f"  release   {Storage(summary.get('dir', '.')).url('release')} (what may be published; README.md is "
        f"its card); {SUMMARY_FILE}, {TRIALS_FILE}: operator-internal"
    )
    return "\n".join(lines)


def _source(summary: dict) -> Optional[Storage]:
    """Where the released outputs come from: the final run (public mode), else the selected trial."""
    where = (
        summary["final"]["dir"]
        if "final" in summary
        else (summary["best"]["dir"] if summary["best"] is not None else None)
    )
    return None if where is None else Storage(where)


def _release_ledger(summary: dict, state_plan: SweepPlan, cfg: config_mod.Config, ws: Workspace) -> privacy.Ledger:
    """The ledger the sweep's release states: the selected trial's (public mode: the final run's; its
    shared central query, if any, included once); with no trial selected, the sweep's own (the shared
    central query, when one ran). Its epsilon is the sweep's bound (``sweep_epsilon``) where that is
    above the trial's own composition; ``seeded`` also when a private sweep's draws were seeded."""
    where, ledger = _source(summary), None
    for name in ("ledger.json", "trial_ledger.json"):
        if ledger is None and where is not None and where.is_file(name):
            ledger = privacy.Ledger.from_state_dict(where.read_json(name))
    if ledger is None and ws.path("ledger.json").is_file():
        ledger = privacy.Ledger.load(ws.path("ledger.json"))
    if ledger is None:
        ledger = privacy.Ledger(accountant=state_plan.accountant, delta=cfg.privacy.delta, n=0)
    if summary["mode"] != "public":
        ledger.sweep_epsilon = float(summary["epsilon"])
    ledger.seeded = (
        ledger.seeded or cfg.run.seed is not None or (summary["mode"] == "private" and cfg.tune.search_seed is not None)
    )
    return ledger


def _validation_fact(summary: dict) -> str:
    """The validation split of a private or naive sweep: protected by epsilon (its selection score, M3, is DP),
    its size public."""
    sizes = {r["val_size"] for r in summary["trials"] if r.get("val_size") is not None}
    size = f"{sizes.pop()} records" if len(sizes) == 1 else "its size"
    return (
        f"{size} of the sensitive source, disjoint from the training split, read only by the DP selection "
        "score (M3); protected by epsilon like the training split"
    )


def _publish_release(cfg: config_mod.Config, summary: dict, state_plan: SweepPlan, ws: Workspace) -> Path:
    """<sweep dir>/release/: the selected trial's (public: the final run's) outputs and the card,
    each part committed to the sweep's storage."""
    from dpfeta import release
    from dpfeta.tune.trial import RELEASE_PARTS

    source, best = _source(summary), summary["best"]
    if source is not None:
        src = Workspace(source)
        try:
            for part in RELEASE_PARTS:
                rel = f"{release.RELEASE_DIR}/{part}"
                if src.fetch(rel) and src.path(rel).is_dir():
                    release.put_dir(ws.local, src.path(rel), part)
        finally:
            src.close()
    ledger = _release_ledger(summary, state_plan, cfg, ws)
    view = release_view(summary)
    metrics = {"epsilon": summary["epsilon"], "delta": summary["delta"], "accountant": summary["accountant"]}
    if best is not None:
        metrics[f"selected/{summary['metric']}"] = best["score"]
    facts = {"tuning mode": summary["mode"], "selection": json.dumps(view, sort_keys=True, default=str)}
    scope = "the sensitive training split"
    if summary["mode"] == "public":
        facts["proxy"] = (
            f"tune.proxy_data={json.dumps(cfg.tune.proxy_data, sort_keys=True)} (declared public: tune.proxy_is_public)"
        )
    else:
        facts["test split"] = "not used by the sweep (the selection score is on the validation split)"
        facts["validation split"] = _validation_fact(summary)
        scope = "the sensitive training and validation splits"
    release.write_json(ws.local, release.SELECTION_FILE, view)
    release.record(
        ws.local,
        kind="sweep",
        ledger=ledger,
        public_config=cfg.public_dict(),
        metrics=metrics,
        extra_facts=facts,
        epsilon=summary["epsilon"],
        notes=[view["note"]],
        scope=scope,
    )
    # Every part is committed now, also a shared central query's (put there before the trials): on an object
    # store each object's time is its upload's, and the release's should not span the trials.
    root = release.release_dir(ws.local)
    for path in sorted(root.iterdir()):
        ws.commit(f"{release.RELEASE_DIR}/{path.name}")
    return root


def _finish(cfg: config_mod.Config, summary: dict, rows: list[dict], tracker, ws: Workspace) -> None:
    """Write the operator's files and the release, then log to the sweep's MLflow run: ``tracker`` (or
    None), or a function that creates it now (private mode: the run is created when the result is known)."""
    from dpfeta import tracking

    _write_trials_csv(rows, ws.path(TRIALS_FILE))
    ws.commit(TRIALS_FILE)
    state_plan = SweepPlan.from_dict(json.loads(ws.path(SWEEP_FILE).read_text())["plan"])
    root = _publish_release(cfg, summary, state_plan, ws)
    tmp = ws.path(SUMMARY_FILE + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    os.replace(tmp, ws.path(SUMMARY_FILE))
    ws.commit(SUMMARY_FILE)  # last: the sweep is complete
    best = summary["best"]
    log.info(
        "sweep '%s' (%s): released epsilon %.4f (delta %g, %s); selected %s",
        summary["name"],
        summary["mode"],
        summary["epsilon"],
        summary["delta"],
        summary["accountant"],
        "none" if best is None else f"{best['trial_id']} score {best['score']:.4f} {best['params']}",
    )
    if callable(tracker):
        tracker = tracker()
    if tracker is None:
        return
    tracker.log_dp_metrics(
        {
            "epsilon": summary["epsilon"],
            **({"selected/score": best["score"], "selected/noise_multiplier": best["sigma"]} if best else {}),
        }
    )
    tracker.log_artifact(root)  # release/... (the only artifacts in release mode)
    tracker.log_artifact(ws.path(SUMMARY_FILE))  # nondp/... (operator view), dropped in release mode
    tracker.log_artifact(ws.path(TRIALS_FILE))
    if best is not None:
        tracker.set_tags({"dpfeta.selected": best["trial_id"]})
        where = Storage(best["dir"])
        if summary["mode"] != "private" and where.is_file(tracking.RUN_FILE):
            best_run = tracking.Tracker(tracker.uri, where.read_json(tracking.RUN_FILE)["run_id"], nondp=False)
            best_run.set_tags({"dpfeta.selected": "true"})
    final = Storage(summary["final"]["dir"]) if "final" in summary else None
    if final is not None and final.is_file(tracking.RUN_FILE):  # public mode: nest the final run too
        final_run = tracking.Tracker(tracker.uri, final.read_json(tracking.RUN_FILE)["run_id"], nondp=False)
        final_run.set_tags({"mlflow.parentRunId": tracker.run_id, "dpfeta.final": "true"})
    tracker.end("FINISHED")
