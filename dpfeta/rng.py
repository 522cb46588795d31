"""The one way dpfeta seeds a generator (docs/privacy.md, "Noise and RNG").

Production (``run.seed`` unset): 63 bits of OS entropy, fresh for every generator and every attempt.
With a seed (tests, reproduction; the run record then says ``seeded``), the state is derived from
(seed, stream, rank, step) by sha256, so purposes and ranks get distinct streams and a resumed attempt
never replays the noise of the attempt it replaces.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Optional


def make_generator(seed: Optional[int], *, stream: str, rank: int = 0, step: int = 0, device="cpu"):
    """A ``torch.Generator`` for one purpose ("central", "warmup", "sample", "noise", ...)."""
    import torch

    generator = torch.Generator(device=device)
    if seed is None:
        generator.manual_seed(secrets.randbits(63))
    else:
        digest = hashlib.sha256(f"{seed}/{stream}/{rank}/{step}".encode()).digest()
        generator.manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return generator


def seeded_generator(seed: Optional[int], *, stream: str):
    """``make_generator`` when a seed is set, else None (the callee then draws from OS entropy and
    records the run as unseeded)."""
    return None if seed is None else make_generator(seed, stream=stream)
