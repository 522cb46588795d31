"""The one way in, before any data is read: the resolved config, the run's privacy plan; the texts
that open and close a run (the budget table, the summary).

Light on purpose (config, data metadata, privacy accounting; no torch, no Ray, no MLflow): ``dpfeta
budget`` and every entry point (CLI, ``ray_jobs/``, ``tune``, ``bench/``) start here, and
``pipeline`` imports its stages at the top.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from dpfeta import config as config_mod
from dpfeta import data, privacy
from dpfeta.config import Config

log = logging.getLogger("dpfeta.pipeline")  # the name users' log filters know


def resolve_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load and validate the config, then fix every privacy-derived value from public facts (``auto``
    central rounds and share, the central noise), before any data is read."""
    cfg = config_mod.load(path, list(overrides))
    resolved = privacy.resolve(cfg, data.public_train_size(cfg))
    chosen = central_auto(cfg, resolved)
    if chosen:
        log.info("central: auto chose %s", auto_text(chosen))
    return resolved


def central_auto(raw: Config, resolved: Config) -> Optional[dict]:
    """What ``central.rounds``/``central.epsilon_share: auto`` chose for ``raw`` (None without auto):
    the numbers, the central images' per-pixel noise std at the calibrated sigma_c, and the rule's reason."""
    choice = privacy.central_choice(raw, data.public_train_size(raw))
    if choice is None:
        return None
    c, d = resolved.central, resolved.data
    std = privacy.pixel_std(
        c.noise_multiplier,
        image_shape=(d.channels, d.resolution, d.resolution),
        downsample=c.downsample,
        batch_size=c.batch_size,
        num_classes=d.num_classes,
    )
    return {
        "rounds": choice.rounds,
        "epsilon_share": choice.epsilon_share,
        "noise_multiplier": c.noise_multiplier,
        "pixel_std": std,
        "rule": choice.reason,
    }


def auto_text(chosen: dict) -> str:
    return (
        f"rounds={chosen['rounds']} epsilon_share={chosen['epsilon_share']:g} "
        f"(sigma_c={chosen['noise_multiplier']:.4g}, per-pixel noise std {chosen['pixel_std']:.3f}): {chosen['rule']}"
    )


def plan_run(cfg: Config) -> privacy.Plan:
    """The privacy plan from public facts only (no data is read)."""
    n = data.public_train_size(cfg)
    for line in config_mod.validate_against_n(cfg, n):
        log.warning(line)
    if cfg.finetune.init == "warmup" and cfg.central.rounds == 0:
        raise ValueError(
            "config key 'central.rounds': expected >= 1 with finetune.init=warmup "
            "(the warm-up trains on the central images), got 0; use finetune.init=scratch"
        )
    if cfg.finetune.init == "warmup" and cfg.warmup.steps == 0:
        raise ValueError(
            "config key 'warmup.steps': expected >= 1 with finetune.init=warmup, got 0; "
            "use finetune.init=scratch for no warm-up"
        )
    return privacy.plan(cfg, n)


def budget_text(cfg: Config, pl: privacy.Plan) -> str:
    return f"privacy plan for run '{cfg.run.name}' (no data read yet)\n" + privacy.plan_table(pl)


def check_train_size(planned: int, found: int, where: str = "the training split") -> None:
    """N is a public fact of the plan: refuse data whose training split has another size (before any
    spend), so the ledger's N is the data's."""
    if found != planned:
        raise ValueError(
            f"data: the plan used N={planned} (public size) but {where} has {found} records; "
            "set data.n_train to the true size"
        )


def summary_text(cfg: Config, result: dict, uri: Optional[str]) -> str:
    """The lines printed when a run is done (imports the evaluation lazily: ``budget`` loads no torch)."""
    from dpfeta import release, tracking
    from dpfeta.evaluate import fid_label, metric
    from dpfeta.storage import Storage

    def shown(name: str, fmt: str) -> str:
        value, is_dp = metric(result, name)
        if value is None:
            return "withheld (release mode: " + ("; ".join(result.get("withheld", [])) or "not computed") + ")"
        return format(value, fmt) + ("" if is_dp else " [non-DP: sensitive test data, not in release/]")

    logreg, _ = metric(result, "logreg_accuracy")
    lines = [
        f"dpfeta run '{cfg.run.name}' done in {result.get('seconds', 0):.0f}s",
        f"  epsilon   {result['epsilon']:.4f} spent (target {result['epsilon_target']:g}, delta {result['delta']:g}, "
        f"{result['accountant']}; composed over every mechanism)",
        f"  accuracy  {shown('accuracy', '.4f')} (reference CNN trained on {result.get('num_synthetic')} synthetic "
        f"images, tested on {result.get('num_test')} real test images)"
        + (f"; logistic regression {logreg:.4f}" if logreg is not None else ""),
        f"  FID       {shown('fid', '.2f')} [{fid_label(result)}; reference: {result.get('fid_reference')}]",
        f"  release   {Storage(cfg.run_location()).url(release.RELEASE_DIR)}  "
        "(what may be published: README.md is its card)",
        f"  run dir   {cfg.run_location()}  (eval.json, ledger.json, checkpoints: operator-internal)",
    ]
    if uri:
        lines.append(f"  MLflow    {tracking.ui_command(uri)}")
    return "\n".join(lines)
