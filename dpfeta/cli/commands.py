"""The bodies of the ``dpfeta`` commands: each takes the parsed arguments and the resolved config (None
for a command that reads no config), calls the library, prints its summary and returns the exit status.
The step-by-step commands (``central`` -> ``warmup`` -> ``finetune`` -> ``sample``) carry the privacy
spent so far from folder to folder in each output's ledger."""

from __future__ import annotations

import json
import logging

from dpfeta import config as config_mod

log = logging.getLogger("dpfeta")


def _plan(cfg):
    """Plan the ledger from public facts only (the same checks as ``dpfeta run``)."""
    from dpfeta import runplan

    return runplan.plan_run(cfg)


def cmd_budget(args, cfg: config_mod.Config) -> int:
    from dpfeta import privacy

    if args.sweep:
        from dpfeta import data, tune
        from dpfeta.privacy import sweep as psweep

        sp = tune.plan_sweep(cfg, data.public_train_size(cfg))
        print(json.dumps(psweep.sweep_plan_json(sp), indent=2) if args.json else psweep.sweep_plan_table(sp))
        return 0
    from dpfeta import runplan

    pl = _plan(cfg)
    chosen = runplan.central_auto(config_mod.load(args.config, args.overrides), cfg)
    if args.json:
        print(json.dumps({**privacy.plan_json(pl), **({"central_auto": chosen} if chosen else {})}, indent=2))
    else:
        print(f"privacy plan for run '{cfg.run.name}' ({args.config}); no data was read")
        print(privacy.plan_table(pl))
        if chosen:
            print(f"central auto       {runplan.auto_text(chosen)}")
    return 0


def cmd_prepare(args, cfg: config_mod.Config) -> int:
    from dpfeta import data

    written = data.prepare(cfg, args.out)
    print(f"wrote the training split as Parquet shards to {written}")
    return 0


def cmd_central(args, cfg: config_mod.Config) -> int:
    from dpfeta import central, cluster, data, rng

    _plan(cfg)  # refuses, before any data is read, when the central query alone spends the target
    central.check_fresh_out(args.out)  # a folder that already spent: refused before any data is read
    splits = data.load_splits(cfg)  # validates before any privacy spend
    generator = rng.seeded_generator(cfg.run.seed, stream="central")
    if generator is not None:
        log.warning("run.seed is set: sampling and noise are reproducible (tests only, not a release)")
    with cluster.session(cfg):
        train = data.to_ray_dataset(splits.train, index=True)
        result, ledger = central.release(cfg, train, args.out, generator=generator)
    c = cfg.central
    print(
        f"wrote {len(result.images)} central images ({c.rounds} rounds x {cfg.data.num_classes} classes) "
        f"to {args.out}/images, grid {args.out}/grid.png, ledger {args.out}/ledger.json"
    )
    print(
        f"epsilon spent: {ledger.epsilon():.4f} (delta={cfg.privacy.delta:g}, accountant="
        f"{ledger.accountant}; central query sigma_c={c.noise_multiplier:.4g}, "
        f"q_c={result.sample_rate:.4g}, rounds={c.rounds}, N={len(splits.train)})"
    )
    return 0


def _stage_ledger(folder: str, *, what: str):
    """The ledger a stage's output folder carries (``ledger.json``, or a checkpoint's meta)."""
    from pathlib import Path

    from dpfeta import privacy

    root = Path(folder)
    for path in (root / "ledger.json", root / "checkpoint" / "meta.json", root / "meta.json"):
        if path.is_file():
            state = json.loads(path.read_text())
            state = state.get("ledger", state) if path.name == "meta.json" else state
            if "mechanisms" in state:
                return privacy.Ledger.from_state_dict(state)
    raise ValueError(
        f"{what} '{root}': expected a folder written by the previous dpfeta stage, with its "
        "ledger.json (the privacy spent so far), found none"
    )


def _check_central_spent(spent, pl, where: str) -> None:
    """The recorded central query must be exactly the one the config plans, and the only spend."""
    import math

    planned = pl.ledger.get("central") if any(m.name == "central" for m in pl.ledger.mechanisms) else None
    recorded = {m.name: m for m in spent.mechanisms if m.taken > 0}
    got = recorded.get("central")
    same = (
        planned is not None
        and got is not None
        and set(recorded) == {"central"}
        and math.isclose(got.noise_multiplier, planned.noise_multiplier, rel_tol=1e-9)
        and math.isclose(got.sample_rate, planned.sample_rate, rel_tol=1e-12)
        and got.taken == planned.planned
        and (spent.n, spent.delta, spent.accountant) == (pl.n, pl.delta, pl.accountant)
    )
    if not same:

        def show(m):
            return (
                "none"
                if m is None
                else f"rounds={m.taken or m.planned}, sigma_c={m.noise_multiplier:.6g}, q_c={m.sample_rate:.6g}"
            )

        raise ValueError(
            f"'{where}' records a different spend ({sorted(recorded)}; central {show(got)}; N={spent.n}, "
            f"delta={spent.delta:g}, {spent.accountant}) than this config plans (central {show(planned)}; "
            f"N={pl.n}, delta={pl.delta:g}, {pl.accountant}); fine-tune with the config the central "
            "images were made with"
        )


def cmd_warmup(args, cfg: config_mod.Config) -> int:
    from pathlib import Path

    from dpfeta import warmup

    ledger = _stage_ledger(args.central, what="--central")  # refuses central images without a ledger
    out = Path(args.out)
    if (out / "ledger.json").is_file() and json.loads((out / "ledger.json").read_text())[
        "mechanisms"
    ] != ledger.state_dict()["mechanisms"]:
        raise ValueError(
            f"'{out}' holds a warm-up of other central images (its ledger.json differs from "
            f"'{args.central}'); choose a new --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    ledger.save(out / "ledger.json")  # the warm-up is post-processing: the same spend, carried on
    summary = warmup.train_warmup(cfg, args.central, args.out, ledger=ledger.state_dict())
    print(
        f"warm-up: step {summary['step']}/{cfg.warmup.steps} ({summary['steps_run']} run now, "
        f"{summary['seconds']:.0f} s), loss {summary['loss']}, U-Net {summary['parameters']:,} parameters; "
        f"checkpoint {summary['checkpoint']} (rerun to resume); epsilon so far {ledger.epsilon():.4f}"
    )
    return 0


def cmd_sample(args, cfg: config_mod.Config) -> int:
    from pathlib import Path

    from dpfeta import cluster, progress, rng, sample

    denoiser = sample.load_denoiser(args.checkpoint, cfg).to(cluster.device(cfg))  # EMA weights
    generator = rng.make_generator(cfg.run.seed, stream="sample")
    num = args.num or cfg.sample.num_samples
    with progress.stage("sample", total=num, unit="img", desc="sampling"):
        images, _ = sample.generate(denoiser, cfg, num, generator=generator, out_dir=args.out)
    try:  # sampling is post-processing: the samples carry the checkpoint's ledger on
        _stage_ledger(args.checkpoint, what="--checkpoint").save(Path(args.out) / "ledger.json")
    except ValueError:
        log.warning(
            "no ledger found with the checkpoint %s: 'dpfeta evaluate' will report epsilon unknown", args.checkpoint
        )
    s = cfg.sample
    print(
        f"wrote {len(images)} images ({s.sampler}, {s.steps} steps, guidance {s.guidance}) to "
        f"{args.out}/images/<class>/, grid {args.out}/grid.png"
    )
    return 0


def cmd_finetune(args, cfg: config_mod.Config) -> int:
    from dpfeta import data, distributed, privacy

    if args.init is None and cfg.finetune.init != "scratch":
        cfg = config_mod.replace(cfg, {"finetune.init": "scratch"})
    pl = _plan(cfg)
    if args.init is not None:
        # compose the spend the warm-up folder carries (central query), refusing another plan's
        _check_central_spent(_stage_ledger(args.init, what="--init"), pl, args.init)
    elif cfg.central.rounds > 0:
        log.warning(
            "no --init: the ledger counts the config's central query (central.rounds=%d) as spent; "
            "set central.rounds=0 for a from-scratch run without central images",
            cfg.central.rounds,
        )
    start = f"warm-up weights in {args.init}" if args.init else "scratch (DPDM baseline; no --init)"
    print(f"DP-SGD fine-tuning of run '{cfg.run.name}' from {start}")
    print(privacy.plan_table(pl))
    splits = data.load_splits(cfg)
    out = args.out or str(cfg.run_dir() / "finetune")
    summary = distributed.fit_finetune(cfg, train=splits.train, plan=pl, init_dir=args.init, out_dir=out)
    print(
        f"finetune: {summary['steps']} of T={pl.steps} steps, composed epsilon {summary['epsilon']:.4f} "
        f"(delta {pl.delta:g}, {pl.accountant}; central query and DP-SGD); ledger {out}/ledger.json, "
        f"checkpoint {summary['checkpoint']} (rerun to resume)"
    )
    return 0


def cmd_evaluate(args, cfg: config_mod.Config) -> int:
    from dpfeta import evaluate

    result = evaluate.evaluate_samples(cfg, args.samples, args.out, protocol=args.protocol, epochs=args.epochs)
    eps = "unknown (no ledger.json)" if result["epsilon"] is None else f"{result['epsilon']:.4f}"
    if args.protocol == "dpimagebench":
        r = result["nondp"]
        each = ", ".join(f"{name} {c['accuracy']:.4f}" for name, c in r["classifiers"].items())
        print(
            f"epsilon {eps}  DPImageBench accuracy {r['accuracy_mean']:.4f} +- {r['accuracy_std']:.4f} ({each})  "
            f"FID {r['fid']:.2f} [{result['fid_kind']}, vs the train split]  (non-DP: sensitive splits)"
        )
        return 0

    def shown(name: str, fmt: str) -> str:
        value, is_dp = evaluate.metric(result, name)
        return "withheld" if value is None else format(value, fmt) + ("" if is_dp else " (non-DP)")

    print(
        f"epsilon {eps}  accuracy {shown('accuracy', '.4f')}  FID {shown('fid', '.2f')} [{evaluate.fid_label(result)}]"
    )
    return 0


def cmd_run(args, cfg: config_mod.Config) -> int:
    from dpfeta import pipeline

    pipeline.run(cfg)
    return 0


def cmd_audit(args, cfg: config_mod.Config) -> int:
    from dpfeta import audit

    audit.check_request(canaries=args.canaries, mode=args.mode)  # before any work
    audit.run_audit(cfg, canaries=args.canaries, mode=args.mode, seed=args.seed)
    return 0


def cmd_tune(args, cfg: config_mod.Config) -> int:
    from dpfeta import tune

    tune.run_sweep(cfg, echo=print)  # plan first (no data read); rerun the same name to resume
    return 0


def cmd_export(args, cfg: None) -> int:
    from dpfeta import export

    if args.no_balance and args.per_class is not None:
        raise ValueError(
            f"--per-class {args.per_class} and --no-balance: expected one of them (a balanced set of "
            "N per class, or every image)"
        )
    per_class = None if args.no_balance else ("min" if args.per_class is None else args.per_class)
    summary = export.export(args.run, args.out, fmt=args.format, per_class=per_class)
    counts = ", ".join(f"{name}: {n}" for name, n in summary["counts"].items())
    print(
        f"exported {summary['num_images']} synthetic images ({counts}) as {args.format} to {summary['out']}; "
        f"card {summary['out']}/README.md states epsilon {summary['epsilon']:.4f} (delta {summary['delta']:g}, "
        f"{summary['accountant']})"
    )
    return 0
