"""The ``dpfeta`` console script. Parses, resolves the config, prints, and calls the library."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import sys
import threading

import dpfeta
from dpfeta import config as config_mod
from dpfeta import console

log = logging.getLogger("dpfeta")

DESCRIPTION = """\
Differentially private image synthesis with the DP-FETA method. dpfeta trains a class-conditional
diffusion model on sensitive images under one total privacy budget (epsilon, delta) and publishes
synthetic images instead of the data: central images (a noisy per-class mean), a warm-up on them,
DP-SGD fine-tuning on Ray Train, sampling and evaluation.

Every command but 'export' reads a YAML config (--config FILE, see configs/) and any number of
--set section.key=value overrides. 'dpfeta COMMAND --help' lists a command's options."""

EPILOG = """\
examples:
  dpfeta budget --config configs/digits.yaml         the privacy plan; reads no data
  dpfeta run --config configs/digits.yaml            the whole pipeline; rerun to resume
  dpfeta run --config configs/digits.yaml --set privacy.epsilon=1 --set run.name=digits-eps1
  dpfeta export --run runs/digits --out digits-synthetic --format hf

A run publishes one folder, <run.dir>/<run.name>/release/: what the reported epsilon covers.
Exit status: 0 done; 2 a refused input, a config or file error (one line on stderr, -v shows the
traceback); 130 interrupted (rerun the same command to resume)."""

# commands that read no config: they work on what another command wrote
NO_CONFIG = ("export",)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config file (see configs/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set privacy.epsilon=1 (repeatable)",
    )


def _load(args) -> config_mod.Config:
    """Load, validate and resolve the config (privacy-derived values fixed from public facts)."""
    from dpfeta import runplan

    return runplan.resolve_config(args.config, args.overrides)


def _plan(cfg):
    """Plan the ledger from public facts only (the same checks as ``dpfeta run``)."""
    from dpfeta import runplan

    return runplan.plan_run(cfg)


def _cmd_budget(args, cfg: config_mod.Config) -> int:
    from dpfeta import privacy

    if args.sweep:
        from dpfeta import data, tune
        from dpfeta.privacy import sweep as psweep

        sp = tune.plan_sweep(cfg, data.public_train_size(cfg))
        print(json.dumps(psweep.sweep_plan_json(sp), indent=2) if args.json else psweep.sweep_plan_table(sp))
        return 0
    pl = _plan(cfg)
    if args.json:
        print(json.dumps(privacy.plan_json(pl), indent=2))
    else:
        print(f"privacy plan for run '{cfg.run.name}' ({args.config}); no data was read")
        print(privacy.plan_table(pl))
    return 0


def _cmd_prepare(args, cfg: config_mod.Config) -> int:
    from dpfeta import data

    written = data.prepare(cfg, args.out)
    print(f"wrote the training split as Parquet shards to {written}")
    return 0


def _cmd_central(args, cfg: config_mod.Config) -> int:
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


def _cmd_warmup(args, cfg: config_mod.Config) -> int:
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


def _cmd_sample(args, cfg: config_mod.Config) -> int:
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


def _cmd_finetune(args, cfg: config_mod.Config) -> int:
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


def _cmd_evaluate(args, cfg: config_mod.Config) -> int:
    from dpfeta import evaluate

    result = evaluate.evaluate_samples(cfg, args.samples, args.out)
    eps = "unknown (no ledger.json)" if result["epsilon"] is None else f"{result['epsilon']:.4f}"

    def shown(name: str, fmt: str) -> str:
        value, is_dp = evaluate.metric(result, name)
        return "withheld" if value is None else format(value, fmt) + ("" if is_dp else " (non-DP)")

    print(
        f"epsilon {eps}  accuracy {shown('accuracy', '.4f')}  FID {shown('fid', '.2f')} [{evaluate.fid_label(result)}]"
    )
    return 0


def _cmd_run(args, cfg: config_mod.Config) -> int:
    from dpfeta import pipeline

    pipeline.run(cfg)
    return 0


def _cmd_audit(args, cfg: config_mod.Config) -> int:
    from dpfeta import audit

    audit.check_request(canaries=args.canaries, mode=args.mode)  # before any work
    audit.run_audit(cfg, canaries=args.canaries, mode=args.mode, seed=args.seed)
    return 0


def _cmd_tune(args, cfg: config_mod.Config) -> int:
    from dpfeta import tune

    tune.run_sweep(cfg, echo=print)  # plan first (no data read); rerun the same name to resume
    return 0


def _cmd_export(args, cfg: None) -> int:
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


_OUT = {"required": True, "help": "output folder"}
# name, handler, help, extra options (every command also takes --config and --set)
COMMANDS = [
    (
        "budget",
        _cmd_budget,
        "print the privacy plan (sigma, q, T, epsilon) without reading data",
        [
            ("--json", {"action": "store_true", "help": "one JSON object instead of a table"}),
            (
                "--sweep",
                {
                    "action": "store_true",
                    "help": "the plan of a 'dpfeta tune' sweep (tune.privacy_mode): per-trial vs single-run sigma",
                },
            ),
        ],
    ),
    (
        "prepare",
        _cmd_prepare,
        "write the training split as Parquet shards for a cluster",
        [("--out", {"required": True, "help": "output folder or URI (s3://, gs://, local)"})],
    ),
    ("central", _cmd_central, "release DP central images (spends the M1 budget)", [("--out", _OUT)]),
    (
        "warmup",
        _cmd_warmup,
        "warm up the diffusion model on central images (no privacy cost)",
        [
            ("--central", {"required": True, "help": "folder written by 'dpfeta central'"}),
            ("--out", {"required": True, "help": "output folder (checkpoints; rerun resumes)"}),
        ],
    ),
    (
        "finetune",
        _cmd_finetune,
        "DP-SGD fine-tuning on Ray Train (spends the M2 budget)",
        [
            ("--init", {"default": None, "help": "warm-up folder; omit for from-scratch (DPDM)"}),
            ("--out", {"default": None, "help": "output folder (default: <run dir>/finetune)"}),
        ],
    ),
    (
        "sample",
        _cmd_sample,
        "generate synthetic images from a checkpoint",
        [
            ("--checkpoint", {"required": True, "help": "checkpoint folder"}),
            ("--out", _OUT),
            ("--num", {"type": int, "default": None, "help": "number of images (default sample.num_samples)"}),
        ],
    ),
    (
        "evaluate",
        _cmd_evaluate,
        "downstream accuracy and FID of a synthetic set",
        [
            ("--samples", {"required": True, "help": "folder of class sub-folders of PNGs"}),
            ("--out", {"default": None, "help": "eval.json path (default: <samples>/eval.json)"}),
        ],
    ),
    ("run", _cmd_run, "the whole pipeline: central, warm-up, DP-SGD, sample, evaluate", []),
    ("tune", _cmd_tune, "Ray Tune sweep under the fixed total budget", []),
    (
        "audit",
        _cmd_audit,
        "empirical lower bound on epsilon from one DP-SGD run with canaries (never a release)",
        [
            ("--canaries", {"type": int, "default": 1000, "metavar": "M", "help": "number of canaries (default 1000)"}),
            ("--mode", {"default": "gradient", "help": "gradient: white-box gradient canaries (default)"}),
            (
                "--seed",
                {"type": int, "default": None, "help": "seed of the inclusion bits (tests; default OS entropy)"},
            ),
        ],
    ),
    (
        "export",
        _cmd_export,
        "write a run's released synthetic images as a dataset with a card (no config)",
        [
            (
                "--run",
                {"required": True, "help": "run (or sweep) directory, or its release/ folder; only release/ is read"},
            ),
            ("--out", {"required": True, "help": "new local output folder (refused if it exists and is not empty)"}),
            (
                "--format",
                {
                    "choices": ("imagefolder", "parquet", "hf"),
                    "default": "hf",
                    "help": "imagefolder: train/<label>/*.png; parquet: data/train-00000.parquet; hf: parquet "
                    "with a Hugging Face dataset card (default)",
                },
            ),
            (
                "--per-class",
                {
                    "type": int,
                    "default": None,
                    "metavar": "N",
                    "help": "images per class (default: the smallest class count, a balanced set)",
                },
            ),
            ("--no-balance", {"action": "store_true", "help": "keep every released image, unbalanced"}),
        ],
    ),
]


def version_text() -> str:
    """dpfeta's version and those of the libraries a result depends on (read without importing them)."""
    from importlib import metadata

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    libraries = ", ".join(f"{name} {version(name)}" for name in ("torch", "opacus", "ray"))
    return f"dpfeta {dpfeta.__version__} ({libraries}; python {platform.python_version()})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpfeta", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=version_text())
    verbose = {
        "action": "store_true",
        "help": "everything on the console: debug logging, Ray's worker output, "
        "library warnings, and the traceback of an error (otherwise in <run dir>/logs/dpfeta.log)",
    }
    quiet = {
        "action": "store_true",
        "help": "for jobs: no progress bars; only the budget table, warnings, errors and the summary",
    }
    parser.add_argument("-v", "--verbose", **verbose)
    parser.add_argument("-q", "--quiet", **quiet)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")

    for name, func, help_text, options in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name not in NO_CONFIG:
            _add_config_args(p)
        for flag, kwargs in options:
            p.add_argument(flag, **kwargs)
        p.add_argument("-v", "--verbose", **verbose, default=argparse.SUPPRESS)  # also after the command
        p.add_argument("-q", "--quiet", **quiet, default=argparse.SUPPRESS)
        p.set_defaults(func=func)
    return parser


def _one_line(exc: BaseException) -> str:
    """An error as one line: an OSError as its reason and file, anything else its message joined."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        message = f"{exc.strerror}: '{exc.filename}'" + (f" -> '{exc.filename2}'" if exc.filename2 else "")
    else:
        message = str(exc) or type(exc).__name__
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


def _stop_cleanly() -> dict:
    """Ctrl-C or SIGTERM stops the command cleanly: a KeyboardInterrupt unwinds the stages (MLflow run
    marked FAILED, a Ray cluster we started shut down; the ledger already counts what was released,
    so rerunning the same command resumes). A second Ctrl-C exits at once."""

    def first(signum, frame):
        signal.signal(signal.SIGINT, lambda *_: os._exit(130))
        signal.signal(signal.SIGTERM, lambda *_: os._exit(143))
        raise KeyboardInterrupt(signal.Signals(signum).name)

    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, first) for sig in (signal.SIGINT, signal.SIGTERM)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose and args.quiet:
        print(f"dpfeta {args.command}: error: --quiet and --verbose: expected at most one of them", file=sys.stderr)
        return 2
    previous = _stop_cleanly()
    console.configure("verbose" if args.verbose else "quiet" if args.quiet else "normal")
    try:
        cfg = None if args.command in NO_CONFIG else _load(args)  # the resolved config, before any work
        return int(args.func(args, cfg) or 0)
    except (ValueError, TypeError, OSError) as exc:  # OSError: unreadable files, permissions, storage
        if args.verbose:
            raise
        print(f"dpfeta {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(
            f"dpfeta {args.command}: interrupted ({exc or 'SIGINT'}); stopped cleanly: what was released is "
            "in the ledger, rerun the same command to resume",
            file=sys.stderr,
        )
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
