"""Calibration time of the privacy ledger (RDP and PLD) on the shipped configs.

Prints wall and CPU time (CPU time is steadier on a loaded machine) per calibration and the calibrated
sigma; no assertions (timings are noisy on shared machines). Run: .venv/bin/python bench/budget.py
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from dpfeta import config, privacy

logging.getLogger("absl").setLevel(logging.ERROR)
ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    cases = [
        ("configs/digits.yaml", 1293),
        ("configs/mnist_28/eps_1.yaml", 60000),
        ("configs/mnist_28/eps_10.yaml", 60000),
        ("configs/celeba_32/eps_1.yaml", 182637),
    ]
    print(f"{'config':<32} {'acct':<5} {'sigma':>9} {'T':>6} {'eps':>8} {'wall s':>8} {'cpu s':>8}")
    for path, n in cases:
        for accountant in ("rdp", "pld"):
            if accountant == "pld" and "celeba" in path:
                continue  # 13,500 PLD self-compositions: minutes, not a calibration benchmark
            cfg = config.load(ROOT / path, [f"privacy.accountant={accountant}"])
            start, cpu = time.perf_counter(), time.process_time()
            pl = privacy.plan(cfg, n)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            print(
                f"{path:<32} {accountant:<5} {pl.noise_multiplier:>9.4f} {pl.steps:>6d} {pl.epsilon:>8.4f} "
                f"{seconds:>8.2f} {cpu:>8.2f}"
            )


if __name__ == "__main__":
    main()
