"""Wall time of one digits run with its folder on a local disk vs on an S3 endpoint, side by side.

    python bench/storage_overhead.py [--repeats 2]

The S3 endpoint is moto's server on 127.0.0.1 (a test dependency), so this measures what the
storage layer adds (commits, the probe, Ray Train checkpoints through pyarrow's S3 client, the
scratch copies), not a cloud's latency. Runs alternate local / S3 to share the machine's noise; the
report is the ratio of medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = [
    "data.resolution=8",
    "model.channels=8",
    "model.channel_mult=[1]",
    "model.num_res_blocks=1",
    "model.attn_resolutions=[]",
    "model.emb_channels=16",
    "warmup.steps=20",
    "warmup.batch_size=16",
    "warmup.checkpoint_every=10",
    "finetune.noise_multiplicity=1",
    "finetune.batch_size=128",
    "finetune.epochs=1",
    "finetune.checkpoint_every=2",
    "sample.steps=8",
    "sample.num_samples=200",
    "sample.batch_size=100",
    "eval.classifier_epochs=2",
    "eval.logreg=false",
    "eval.fid.num_samples=200",
    "eval.fid.inception_weights=null",
    "tracking.enabled=false",
    "central.rounds=2",
    "central.noise_multiplier=null",
    "central.epsilon_share=0.3",
    "central.batch_size=600",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import boto3
    from moto.server import ThreadedMotoServer

    from dpfeta import pipeline

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
    )
    boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket="dpfeta-bench")
    times = {"local": [], "s3": []}
    with tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp:
        for r in range(args.repeats):
            for kind, where in (("local", f"{tmp}/runs"), ("s3", "s3://dpfeta-bench/runs")):
                cfg = pipeline.resolve_config(None, [*TINY, f"run.dir={where}", f"run.name={kind}{r}"])
                start = time.perf_counter()
                pipeline.run(cfg, echo=lambda _: None)
                times[kind].append(time.perf_counter() - start)
                print(f"{kind} run {r}: {times[kind][-1]:.1f} s", flush=True)
    server.stop()
    local, s3 = statistics.median(times["local"]), statistics.median(times["s3"])
    print(
        f"| storage | median wall time (s) | runs |\n|---|---|---|\n| local | {local:.1f} | {len(times['local'])} |\n"
        f"| s3 (moto, 127.0.0.1) | {s3:.1f} | {len(times['s3'])} |\nS3 / local = {s3 / local:.2f}"
    )


if __name__ == "__main__":
    main()
