"""The ``dpfeta`` console script. Parses, resolves the config, prints, and calls the library."""

from __future__ import annotations

import argparse
import os
import platform
import signal
import sys
import threading

import dpfeta
from dpfeta import config as config_mod
from dpfeta import console
from dpfeta.cli import commands

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


_OUT = {"required": True, "help": "output folder"}
# name, handler, help, extra options (every command also takes --config and --set)
COMMANDS = [
    (
        "budget",
        commands.cmd_budget,
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
        commands.cmd_prepare,
        "write the training split as Parquet shards for a cluster",
        [("--out", {"required": True, "help": "output folder or URI (s3://, gs://, local)"})],
    ),
    ("central", commands.cmd_central, "release DP central images (spends the M1 budget)", [("--out", _OUT)]),
    (
        "warmup",
        commands.cmd_warmup,
        "warm up the diffusion model on central images (no privacy cost)",
        [
            ("--central", {"required": True, "help": "folder written by 'dpfeta central'"}),
            ("--out", {"required": True, "help": "output folder (checkpoints; rerun resumes)"}),
        ],
    ),
    (
        "finetune",
        commands.cmd_finetune,
        "DP-SGD fine-tuning on Ray Train (spends the M2 budget)",
        [
            ("--init", {"default": None, "help": "warm-up folder; omit for from-scratch (DPDM)"}),
            ("--out", {"default": None, "help": "output folder (default: <run dir>/finetune)"}),
        ],
    ),
    (
        "sample",
        commands.cmd_sample,
        "generate synthetic images from a checkpoint",
        [
            ("--checkpoint", {"required": True, "help": "checkpoint folder"}),
            ("--out", _OUT),
            ("--num", {"type": int, "default": None, "help": "number of images (default sample.num_samples)"}),
        ],
    ),
    (
        "evaluate",
        commands.cmd_evaluate,
        "downstream accuracy and FID of a synthetic set",
        [
            ("--samples", {"required": True, "help": "folder of class sub-folders of PNGs"}),
            ("--out", {"default": None, "help": "result path (default: <samples>/eval.json, eval-<protocol>.json)"}),
            (
                "--protocol",
                {
                    "default": "dpfeta",
                    "choices": ["dpfeta", "dpimagebench"],
                    "help": "dpfeta (reference CNN, FID vs the test split) or dpimagebench (3 classifiers, "
                    "noisy-validation selection, FID vs the training split; non-DP: needs tracking.nondp)",
                },
            ),
            ("--epochs", {"type": int, "default": None, "help": "dpimagebench: classifier epochs (default 50)"}),
        ],
    ),
    ("run", commands.cmd_run, "the whole pipeline: central, warm-up, DP-SGD, sample, evaluate", []),
    ("tune", commands.cmd_tune, "Ray Tune sweep under the fixed total budget", []),
    (
        "audit",
        commands.cmd_audit,
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
        commands.cmd_export,
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
    versions = dpfeta.library_versions("torch", "opacus", "ray")
    libraries = ", ".join(f"{name} {version or 'not installed'}" for name, version in versions.items())
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
