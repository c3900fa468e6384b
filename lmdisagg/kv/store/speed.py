"""SpeedModel: is loading a chunk from a tier faster than recomputing it? Both rates are measured.

    prefill rate   tokens/s the engine computed in a step (EWMA over steps that prefilled)
    tier rate      bytes/s a tier delivered to a load (EWMA over loads served by that tier alone)

    recompute as bytes/s = prefill rate x (chunk bytes / chunk tokens)
    a tier is slow when its rate is below that: its chunks are left to recompute

Unknown rates count as fast (the first load through a tier measures it). A slow tier is probed
again every ``probe_every_s`` so a transient slowness does not ban it for good. The engine
bridge owns one and calls it from the step-loop thread only.
"""
from __future__ import annotations

import time


class SpeedModel:
    def __init__(self, bytes_per_token: float, probe_every_s: float = 30.0, alpha: float = 0.3):
        self.bytes_per_token = bytes_per_token
        self.probe_every_s = probe_every_s
        self.alpha = alpha
        self.prefill_tps: float | None = None
        self.tier_bps: dict[str, float] = {}
        self._last_probe: dict[str, float] = {}  # when each tier was last measured

    def _ewma(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.alpha) * old + self.alpha * new

    def observe_step(self, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            self.prefill_tps = self._ewma(self.prefill_tps, tokens / seconds)

    def observe_load(self, tier: str, nbytes: int, seconds: float) -> None:
        if nbytes > 0:
            self.tier_bps[tier] = self._ewma(self.tier_bps.get(tier), nbytes / max(seconds, 1e-6))
            self._last_probe[tier] = time.monotonic()

    def usable_run(self, tiers: list[str]) -> int:
        """How many leading chunks (served by ``tiers[i]``) to load before the first slow tier."""
        if not self.prefill_tps:
            return len(tiers)
        need = self.prefill_tps * self.bytes_per_token
        now = time.monotonic()
        for i, name in enumerate(tiers):
            bps = self.tier_bps.get(name)
            if bps is None or bps >= need:
                continue
            if now - self._last_probe.get(name, now) > self.probe_every_s:
                self._last_probe[name] = now  # load through it once more, measuring it again
                continue
            return i
        return len(tiers)
