"""Validation of a config, one function per section (data-independent; ``validate_against_n`` holds the
checks that need the public training-split size N, which the data layer re-checks against the data).

``validate`` runs the sections in the schema's order and raises on the first error, a ``ValueError``
naming the dotted key, what it expects and the value it got."""

from __future__ import annotations

from typing import Any

from dpfeta.config import schema


def _check(cond: bool, key: str, expected: str, value: Any) -> None:
    if not cond:
        raise ValueError(f"config key '{key}': expected {expected}, got {value!r}")


def validate(cfg: schema.Config) -> None:
    """Every section's checks; the first failing one raises."""
    resolution = cfg.data.resolution
    _validate_data(cfg.data)
    _validate_central(cfg.central, resolution)
    _validate_model(cfg.model, resolution)
    _validate_diffusion(cfg.diffusion)
    _validate_warmup(cfg.warmup)
    _validate_finetune(cfg.finetune)
    _validate_privacy(cfg.privacy)
    _validate_sample(cfg.sample)
    _validate_tune(cfg.tune)
    _validate_run(cfg.run)


def _validate_data(d: schema.DataConfig) -> None:
    _check(d.source in schema.SOURCES, "data.source", "one of " + ", ".join(schema.SOURCES), d.source)
    _check(d.source == "digits" or d.path is not None, "data.path", f"a path for data.source={d.source}", d.path)
    _check(d.resolution >= 4 and d.resolution % 2 == 0, "data.resolution", "an even integer >= 4", d.resolution)
    _check(d.channels in (1, 3), "data.channels", "1 or 3", d.channels)
    _check(d.num_classes >= 1, "data.num_classes", "an integer >= 1", d.num_classes)
    _check(0.0 <= d.val_fraction < 0.5, "data.val_fraction", "a fraction in [0, 0.5)", d.val_fraction)
    _check(0.0 <= d.test_fraction < 0.5, "data.test_fraction", "a fraction in [0, 0.5)", d.test_fraction)


def _validate_central(c: schema.CentralConfig, resolution: int) -> None:
    """The central query M1 (central.rounds and central.epsilon_share are checked here)."""
    _check(
        c.rounds == "auto" or (isinstance(c.rounds, int) and c.rounds >= 0),
        "central.rounds",
        "an integer >= 0 or auto",
        c.rounds,
    )
    _check(
        c.noise_multiplier is None or c.noise_multiplier > 0,
        "central.noise_multiplier",
        "null (calibrate from central.epsilon_share) or a number > 0",
        c.noise_multiplier,
    )
    _check(
        c.epsilon_share == "auto" or (isinstance(c.epsilon_share, float) and 0 < c.epsilon_share < 1),
        "central.epsilon_share",
        "a fraction in (0, 1) or auto",
        c.epsilon_share,
    )
    _check(c.batch_size > 0, "central.batch_size", "a number > 0", c.batch_size)
    _check(
        c.downsample >= 1 and resolution % c.downsample == 0,
        "central.downsample",
        f"a factor >= 1 dividing data.resolution={resolution}",
        c.downsample,
    )


def _validate_model(m: schema.ModelConfig, resolution: int) -> None:
    _check(m.channels >= 8, "model.channels", "an integer >= 8", m.channels)
    _check(
        len(m.channel_mult) >= 1 and all(x >= 1 for x in m.channel_mult),
        "model.channel_mult",
        "a non-empty list of integers >= 1",
        m.channel_mult,
    )
    _check(
        resolution % (2 ** (len(m.channel_mult) - 1)) == 0,
        "model.channel_mult",
        f"at most log2 levels for data.resolution={resolution}",
        m.channel_mult,
    )
    _check(m.num_res_blocks >= 1, "model.num_res_blocks", "an integer >= 1", m.num_res_blocks)


def _validate_diffusion(x: schema.DiffusionConfig) -> None:
    _check(x.sigma_data > 0, "diffusion.sigma_data", "a number > 0", x.sigma_data)
    _check(0 <= x.label_drop_prob < 1, "diffusion.label_drop_prob", "a probability in [0, 1)", x.label_drop_prob)


def _validate_warmup(w: schema.WarmupConfig) -> None:
    _check(w.steps >= 0, "warmup.steps", "an integer >= 0", w.steps)
    _check(w.batch_size >= 1, "warmup.batch_size", "an integer >= 1", w.batch_size)
    _check(w.noise_multiplicity >= 1, "warmup.noise_multiplicity", "K >= 1", w.noise_multiplicity)
    _check(0 <= w.randaug_magnitude <= 30, "warmup.randaug_magnitude", "an integer in [0, 30]", w.randaug_magnitude)
    _check(
        set(w.randaug_exclude) <= set(schema.RANDAUG_OPS),
        "warmup.randaug_exclude",
        "a list of RandAugment ops (" + ", ".join(schema.RANDAUG_OPS) + ")",
        list(w.randaug_exclude),
    )


def _validate_finetune(f: schema.FinetuneConfig) -> None:
    _check(f.init in schema.INIT_MODES, "finetune.init", "one of " + ", ".join(schema.INIT_MODES), f.init)
    _check(f.batch_size > 0, "finetune.batch_size", "a number > 0", f.batch_size)
    _check(f.epochs > 0, "finetune.epochs", "a number > 0", f.epochs)
    _check(f.noise_multiplicity >= 1, "finetune.noise_multiplicity", "K >= 1", f.noise_multiplicity)
    _check(f.max_grad_norm > 0, "finetune.max_grad_norm", "a number > 0", f.max_grad_norm)
    _check(f.physical_batch_size >= 1, "finetune.physical_batch_size", "an integer >= 1", f.physical_batch_size)
    _check(
        f.grad_sample_mode in ("hooks", "functorch"),
        "finetune.grad_sample_mode",
        "hooks or functorch (both handle empty batches as used here)",
        f.grad_sample_mode,
    )
    _check(0 <= f.ema_decay < 1, "finetune.ema_decay", "a decay in [0, 1)", f.ema_decay)


def _validate_privacy(p: schema.PrivacyConfig) -> None:
    _check(p.epsilon > 0, "privacy.epsilon", "a number > 0", p.epsilon)
    _check(0 < p.delta < 1, "privacy.delta", "a number in (0, 1)", p.delta)
    _check(
        p.accountant in schema.ACCOUNTANTS,
        "privacy.accountant",
        "one of " + ", ".join(schema.ACCOUNTANTS),
        p.accountant,
    )
    _check(
        p.noise_multiplier is None or p.noise_multiplier > 0,
        "privacy.noise_multiplier",
        "null (calibrate) or a number > 0",
        p.noise_multiplier,
    )


def _validate_sample(s: schema.SampleConfig) -> None:
    _check(s.sampler in schema.SAMPLERS, "sample.sampler", "one of " + ", ".join(schema.SAMPLERS), s.sampler)
    _check(s.steps >= 2, "sample.steps", "an integer >= 2", s.steps)
    _check(0 < s.sigma_min < s.sigma_max, "sample.sigma_min", f"0 < sigma_min < sigma_max={s.sigma_max}", s.sigma_min)
    _check(s.num_samples >= 1, "sample.num_samples", "an integer >= 1", s.num_samples)
    _check(s.shard_size >= 1, "sample.shard_size", "an integer >= 1", s.shard_size)
    _check(s.compile in schema.COMPILE_MODES, "sample.compile", "one of " + ", ".join(schema.COMPILE_MODES), s.compile)


def _validate_tune(t: schema.TuneConfig) -> None:
    _check(
        t.privacy_mode in schema.TUNE_MODES,
        "tune.privacy_mode",
        "one of " + ", ".join(schema.TUNE_MODES),
        t.privacy_mode,
    )
    _check(t.num_trials >= 1, "tune.num_trials", "an integer >= 1", t.num_trials)
    _check(t.scheduler in ("fifo", "asha"), "tune.scheduler", "fifo or asha", t.scheduler)
    _check(
        t.trial_distribution in ("truncated_negative_binomial", "poisson"),
        "tune.trial_distribution",
        "truncated_negative_binomial or poisson",
        t.trial_distribution,
    )
    _check(t.score_noise > 0, "tune.score_noise", "a number > 0", t.score_noise)
    _check(t.central in ("auto", "shared", "per_trial"), "tune.central", "auto, shared or per_trial", t.central)
    if t.privacy_mode == "private":
        _check(
            t.scheduler == "fifo",
            "tune.scheduler",
            "fifo in tune.privacy_mode=private (adaptive schedulers and searchers -- ASHA, HyperBand, PBT, "
            "Bayesian search -- decide on private intermediate scores and are outside the random-stopping "
            "analysis of Papernot & Steinke; use privacy_mode=naive or public)",
            t.scheduler,
        )
        _check(
            t.metric == "score",
            "tune.metric",
            "score (the DP validation score, M3) in tune.privacy_mode=private",
            t.metric,
        )
    if t.privacy_mode != "public":
        _check(
            not t.metric.startswith("nondp/"), "tune.metric", "a DP metric (selecting on a non-DP one leaks)", t.metric
        )


def _validate_run(r: schema.RunConfig) -> None:
    if isinstance(r.num_workers, tuple):
        lo, hi = r.num_workers
        _check(1 <= lo <= hi, "run.num_workers", "[min, max] with 1 <= min <= max", list(r.num_workers))
    else:
        _check(r.num_workers >= 1, "run.num_workers", "an integer >= 1 or [min, max]", r.num_workers)
    _check(bool(r.name) and "/" not in r.name, "run.name", "a non-empty name without '/'", r.name)
    _check(r.precision in schema.PRECISIONS, "run.precision", "one of " + ", ".join(schema.PRECISIONS), r.precision)
    _check(r.placement in schema.PLACEMENTS, "run.placement", "one of " + ", ".join(schema.PLACEMENTS), r.placement)
    _check(
        r.stage_placement in schema.STAGE_PLACEMENTS,
        "run.stage_placement",
        "one of " + ", ".join(schema.STAGE_PLACEMENTS),
        r.stage_placement,
    )
    _check(r.resize_interval_s > 0, "run.resize_interval_s", "a number of seconds > 0", r.resize_interval_s)
    for key in ("worker_resources", "stage_resources"):
        res = getattr(r, key)
        _check(
            all(
                isinstance(k, str) and k not in ("CPU", "GPU") and isinstance(v, (int, float)) and v > 0
                for k, v in res.items()
            ),
            f"run.{key}",
            "a map of custom resource name -> amount > 0 (CPU and GPU come from run.cpus_per_worker and run.use_gpu)",
            res,
        )
    _check(r.cpus_per_worker > 0, "run.cpus_per_worker", "a number > 0", r.cpus_per_worker)


def validate_against_n(cfg: schema.Config, n: int) -> list[str]:
    """Checks that need the (public) training-split size N. Raises on errors, returns advice."""
    advice = []
    _check(n >= 1, "data", "a non-empty training split", n)
    _check(
        cfg.central.batch_size <= n, "central.batch_size", f"an expected sample size <= N={n}", cfg.central.batch_size
    )
    _check(cfg.finetune.batch_size <= n, "finetune.batch_size", f"an expected batch <= N={n}", cfg.finetune.batch_size)
    if cfg.privacy.delta >= 1.0 / n:
        raise ValueError(
            f"config key 'privacy.delta': expected delta < 1/N = {1.0 / n:.3g} (N={n}), got {cfg.privacy.delta!r}"
        )
    if cfg.privacy.delta > 0.1 / n:
        advice.append(f"privacy.delta={cfg.privacy.delta:g} is above 0.1/N={0.1 / n:.3g}; delta << 1/N is advised")
    return advice
