"""Peak driver memory of ``dpfeta run`` against N: data read on the driver vs a prepared folder.

    python bench/driver_memory.py [--sizes 20000 200000] [--resolution 28]

For each N a synthetic ten-class set of random ``--resolution`` px images (this measures memory, not
quality; default 28 px, so that the data's weight shows: 200,000 images are 157 MB as uint8 and
627 MB as float32) is written as an npz file and as a prepared Parquet folder (``dpfeta prepare``);
``dpfeta run`` then runs in a fresh process on each, with a tiny model and a few DP-SGD steps, and reports
that process's peak resident memory (``ru_maxrss``). The Ray processes are not counted: the question is what the
driver (a cluster's head node) holds. Digits (N=1,258, read in memory) is the first row.

Expected: with a prepared folder the driver's peak does not grow with N (it reads meta.json; Ray
Data reads the shards on the cluster); read in memory, it grows with N.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = [
    "model.channels=8",
    "model.channel_mult=[1]",
    "model.num_res_blocks=1",
    "model.attn_resolutions=[]",
    "model.emb_channels=16",
    "warmup.steps=2",
    "warmup.batch_size=16",
    "finetune.noise_multiplicity=1",
    "sample.steps=2",
    "sample.num_samples=40",
    "sample.batch_size=40",
    "eval.classifier_epochs=1",
    "eval.logreg=false",
    "eval.fid.num_samples=40",
    "eval.fid.inception_weights=null",
    "tracking.enabled=false",
    "central.rounds=1",
    "central.noise_multiplier=null",
    "central.epsilon_share=0.3",
    "privacy.accountant=rdp",
    "privacy.delta=1e-6",
]

CHILD = r"""
import json, resource, sys
from dpfeta import pipeline
cfg = pipeline.resolve_config(None, sys.argv[1:])
result = pipeline.run(cfg, echo=lambda _: None)
print("RESULT " + json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                              "epsilon": result["epsilon"], "steps": result["steps"]}))
"""


def run(overrides: list[str]) -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    out = subprocess.run([sys.executable, "-c", CHILD, *overrides], capture_output=True, text=True, env=env, cwd=ROOT)
    line = next((text for text in out.stdout.splitlines() if text.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"run failed:\n{out.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20000, 200000])
    parser.add_argument("--resolution", type=int, default=28)
    args = parser.parse_args()
    px = args.resolution
    from dpfeta import config, data

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-mem-") as tmp:
        tmp = Path(tmp)
        common = [*TINY, f"run.dir={tmp}/runs"]
        r = run([*common, "data.resolution=8", "run.name=digits", "finetune.batch_size=128", "finetune.epochs=0.2"])
        rows.append(("digits", 1258, "driver memory", r))
        for n in args.sizes:
            rng = np.random.default_rng(n)
            x = rng.integers(0, 256, (n, 1, px, px), dtype=np.uint8)
            y = rng.integers(0, 10, n)
            npz = tmp / f"set{n}.npz"
            np.savez(npz, x=x, y=y)
            del x, y
            batch = max(128, n // 100)  # q = 0.01: about 2 DP-SGD steps at 0.02 epochs
            source = [
                f"data.resolution={px}",
                "data.source=npz",
                f"data.path={npz}",
                "data.val_fraction=0.01",
                "data.test_fraction=0.01",
                "data.num_classes=10",
                f"finetune.batch_size={batch}",
                "finetune.epochs=0.02",
                f"central.batch_size={batch}",
            ]
            prepared = tmp / f"prepared{n}"
            data.prepare(config.load(None, [*TINY, *source]), str(prepared), rows_per_shard=20000)
            n_train = data.prepared_meta(str(prepared))["sizes"]["train"]
            r_mem = run([*common, *source, f"run.name=npz{n}"])
            r_pre = run([*common, *source, f"run.name=pre{n}", "data.source=parquet", f"data.path={prepared}"])
            rows.append(("npz", n_train, "driver memory", r_mem))
            rows.append(("prepared", n_train, "Ray Data on the cluster", r_pre))
            print(f"N={n_train}: in memory {r_mem['peak_mb']:.0f} MB, prepared {r_pre['peak_mb']:.0f} MB", flush=True)
    print(f"images {px}x{px} (digits: 8x8)")
    print("| data | N (train) | read by | driver peak RSS (MB) | DP-SGD steps | epsilon |")
    print("|---|---|---|---|---|---|")
    for name, n, how, r in rows:
        print(f"| {name} | {n:,} | {how} | {r['peak_mb']:.0f} | {r['steps']} | {r['epsilon']:.3f} |")


if __name__ == "__main__":
    main()
