"""The release: one folder holding exactly what a run or a sweep may publish (docs/privacy.md §1, §7).

``<run dir>/release/`` (a sweep: ``<sweep dir>/release/``) is built stage by stage and holds only
outputs covered by the reported epsilon, and the public facts needed to read them::

    central/      the DP central images (M1): images/<class>/<i>.png, grid.png, central.json
    model/        the selected weights: ema.pt, model.pt (raw), meta.json (noise seed redacted)
    samples/      the synthetic images: images/<class>/*.png, grid.png, samples.json
    metrics.json  DP metrics only (evaluation against a public test set; a sweep's noisy score)
    ledger.json   every mechanism, its parameters and counts, the composed epsilon
    config.json   the public config (noise seeds redacted)
    release.json  the card as data: (epsilon, delta), accountant, neighbouring relation, N, public
                  facts, seeded, config hash, the list of files
    README.md     the same card for people
    selection.json  (a sweep) the selected trial: opaque id, hyperparameters, noisy score, sigma

Everything else a run writes (checkpoints with optimiser state, eval.json's non-DP section, a
sweep's per-trial folders, scores and trial count) is operator-internal. MLflow receives artifacts
through ``tracking``, which maps a file of this folder to ``release/...`` and anything else to
``nondp/...`` (dropped in release mode, ``tracking.nondp: false``); see ``tracking.Tracker``.

Every write is atomic (a temporary sibling, then a rename), so a crash never leaves a half-written
file in place of a good one. Files are copied without their metadata, and ``record`` gives every file
and folder of release/ one time (the release's): a copied file's time would tell when a sweep's trial
ran. This module imports neither torch nor Ray.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Optional

from dpfeta import privacy
from dpfeta.config import SEED_REDACTED

RELEASE_DIR = "release"
CARD_FILE, RECORD_FILE, METRICS_FILE, LEDGER_FILE, CONFIG_FILE, SELECTION_FILE = (
    "README.md",
    "release.json",
    "metrics.json",
    "ledger.json",
    "config.json",
    "selection.json",
)
MODEL_FILES = ("ema.pt", "model.pt")  # never optimizer.pt / extra.pt (RNG state: noise seeds)


def release_dir(run_dir: Path | str) -> Path:
    return Path(run_dir) / RELEASE_DIR


def _atomic_write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json(run_dir: Path | str, name: str, obj: Any) -> Path:
    return _atomic_write(release_dir(run_dir) / name, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def put_dir(run_dir: Path | str, src: Path | str, name: str, *, only: Optional[Iterable[str]] = None) -> Path:
    """Copy the folder ``src`` (or only the files named in ``only``) to ``release/<name>``, atomically."""
    src, final = Path(src), release_dir(run_dir) / name
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if only is None:
        shutil.copytree(src, tmp, copy_function=shutil.copyfile)  # contents only: no times, no modes
    else:
        tmp.mkdir(parents=True)
        for file in only:
            if (src / file).is_file():
                shutil.copyfile(src / file, tmp / file)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def put_model(run_dir: Path | str, weights_dir: Path | str) -> Path:
    """The final weights (EMA and raw) and their meta.json without the noise seed or RNG state."""
    out = put_dir(run_dir, weights_dir, "model", only=MODEL_FILES)
    meta_path = Path(weights_dir) / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        meta.pop("rng", None)
        run = meta.get("config", {}).get("run", {})
        if run.get("seed") is not None:
            run["seed"] = SEED_REDACTED
        _atomic_write(out / "meta.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


def config_hash(public_config: dict) -> str:
    """sha256 of the public config (canonical JSON): names the exact configuration released."""
    return hashlib.sha256(json.dumps(public_config, sort_keys=True).encode()).hexdigest()


def record(
    run_dir: Path | str,
    *,
    kind: str,
    ledger: privacy.Ledger,
    public_config: dict,
    metrics: Optional[dict] = None,
    extra_facts: Optional[dict] = None,
    notes: Iterable[str] = (),
    epsilon: Optional[float] = None,
    scope: str = "the sensitive training split",
) -> dict:
    """Write ledger.json, config.json, metrics.json (if any), release.json and README.md.

    ``kind`` is "run" or "sweep"; ``extra_facts``: further public facts (test split, proxy, the
    selection ...); ``notes``: sentences for the card. ``epsilon``: the total to state when it is
    not the ledger's own (a sweep: the bound over the whole search, which is >= the selected
    trial's ledger; the ledger then carries it as ``sweep_epsilon``); by default the ledger's composed
    epsilon. ``scope``: the records the guarantee is about (a private sweep's selection score also
    reads the validation split). Every file and folder of release/ is then given one time.
    """
    root = release_dir(run_dir)
    # the worker groups (restarts, resizes) follow the realised batches (time, memory): not published
    ledger = privacy.Ledger.from_state_dict({**ledger.state_dict(), "groups": []})
    ledger.save(_ensure(root) / LEDGER_FILE)
    _restate_model_meta(root, ledger)
    write_json(run_dir, CONFIG_FILE, public_config)
    if metrics is not None:
        write_json(run_dir, METRICS_FILE, metrics)
    eps = ledger.epsilon() if epsilon is None else float(epsilon)
    if eps < ledger.epsilon() * (1 - 1e-6):
        raise ValueError(f"internal: stated epsilon {eps} is below the ledger's {ledger.epsilon()}")
    rec = {
        "kind": kind,
        "epsilon": eps,
        "delta": ledger.delta,
        "accountant": ledger.accountant,
        "epsilon_planned": ledger.epsilon(planned=True),
        "neighbouring_relation": privacy.NEIGHBOURING_RELATION,
        "protects": scope,
        "n": ledger.n,
        "public_facts": list(privacy.PUBLIC_FACTS) + sorted(f"{k}: {v}" for k, v in (extra_facts or {}).items()),
        "seeded": ledger.seeded,
        "config_sha256": config_hash(public_config),
        "mechanisms": [
            {
                "name": m.name,
                "noise_multiplier": m.noise_multiplier,
                "sample_rate": m.sample_rate,
                "taken": m.taken,
                "planned": m.planned,
                "shared": m.shared,
            }
            for m in ledger.mechanisms
        ],
        "repeat_and_select": ledger.repeat,
        "notes": list(notes),
    }
    rec["files"] = sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and not p.name.endswith(".tmp") and p.name not in (RECORD_FILE, CARD_FILE)
    )
    write_json(run_dir, RECORD_FILE, rec)
    _atomic_write(root / CARD_FILE, card_text(rec, metrics or {}))
    stamp(root)
    return rec


def stamp(root: Path, when: Optional[float] = None) -> None:
    """Give every file and folder under ``root`` (and ``root``) one modification time (now by default)."""
    when = time.time() if when is None else when
    paths = sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True)  # files before their folders
    for path in [*paths, root]:
        os.utime(path, (when, when), follow_symlinks=False)


def _restate_model_meta(root: Path, ledger: privacy.Ledger) -> None:
    """model/meta.json states the release's epsilon and ledger (a sweep: the bound over the whole search,
    not the selected trial's own composition, which it copied from the trial)."""
    path = root / "model" / "meta.json"
    if not path.is_file():
        return
    meta = json.loads(path.read_text())
    meta.update(epsilon=ledger.epsilon(), ledger=ledger.state_dict())
    _atomic_write(path, json.dumps(meta, indent=2, sort_keys=True) + "\n")


def _ensure(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    return root


def _where(mech: dict, repeated: bool) -> str:
    """Where a mechanism sits in a sweep's composition (nothing for a single run)."""
    if not repeated:
        return ""
    return " (once, before the trials: shared)" if mech.get("shared") else " (the selected trial's)"


def files_summary(files: list[str], most: int = 12) -> list[str]:
    """The card's file list: a folder holding more than ``most`` files (the images) is one entry with
    its count; release.json keeps every name."""
    groups: dict[str, list[str]] = {}
    for name in files:
        groups.setdefault(name.rsplit("/", 2)[0] if name.count("/") >= 2 else name, []).append(name)
    out = []
    for key, names in groups.items():
        if len(names) > most:
            out.append(f"{key}/... ({len(names):,} files)")
        else:
            out.extend(names)
    return out


UNIT_OF_PRIVACY = (
    "one record (one image with its label); several images of one person are protected together "
    "only by group privacy (k images: roughly k times epsilon, and a larger delta)"
)


def card_text(rec: dict, metrics: dict) -> str:
    """The model/dataset card of a release (markdown)."""
    lines = [
        f"# dpfeta release ({rec['kind']})",
        "",
        f"This folder is (epsilon = {rec['epsilon']:.4f}, delta = {rec['delta']:g})-differentially private "
        f"with respect to {rec.get('protects', 'the sensitive training split')}, accounted with the "
        f"{rec['accountant']} accountant (composed over every mechanism that touched the data).",
        "",
        f"- neighbouring relation: {rec['neighbouring_relation']}",
        f"- unit of privacy: {UNIT_OF_PRIVACY}",
        f"- N (training-split size, public): {rec['n']}",
        f"- seeded: {str(rec['seeded']).lower()}"
        + (
            " (a fixed seed was used for sampling and noise: tests or reproduction only, not a production release)"
            if rec["seeded"]
            else " (sampling and noise from OS entropy)"
        ),
        f"- config sha256: {rec['config_sha256']} (config.json; noise seeds redacted)",
        "- public facts: " + "; ".join(rec["public_facts"]),
        "",
        "| mechanism | noise multiplier | sample rate | taken / planned |",
        "|---|---|---|---|",
    ]
    repeated = bool(rec.get("repeat_and_select"))
    lines += [
        f"| {m['name']}{_where(m, repeated)} | {m['noise_multiplier']:.4f} | {m['sample_rate']:.5g} | "
        f"{m['taken']} / {m['planned']} |"
        for m in rec["mechanisms"]
    ]
    if rec.get("repeat_and_select"):
        lines += [
            "",
            f"Selection: one trial out of a random number of trials (repeat-and-select, "
            f"{json.dumps(rec['repeat_and_select'], sort_keys=True)}); only the selected trial's "
            "outputs are here, under an opaque id.",
        ]
    if metrics:
        lines += ["", "DP metrics (metrics.json):", ""] + [f"- {k}: {v}" for k, v in sorted(metrics.items())]
    lines += ["", "Files: " + ", ".join(files_summary(rec["files"]))]
    if rec["notes"]:
        lines += [""] + [f"- {n}" for n in rec["notes"]]
    lines += [
        "",
        "Anything not in this folder (checkpoints with optimiser state, non-DP metrics, other trials) "
        "is not covered by this epsilon and must not be published.",
    ]
    return "\n".join(lines) + "\n"


def public_metrics(result: dict) -> dict:
    """What release/metrics.json holds: the privacy summary and the DP metrics, nothing non-DP."""
    keys = ("epsilon", "delta", "accountant", "noise_multiplier", "sample_rate", "steps", "seeded")
    out = {k: result[k] for k in keys if k in result}
    out.update(result.get("dp", {}))
    out.update({k: result[k] for k in ("num_synthetic", "num_test", "test_split_public") if k in result})
    if "fid" in result.get("dp", {}):
        out.update({k: result[k] for k in ("fid_kind", "fid_reference", "fid_samples", "fid_weights")})
    return out
