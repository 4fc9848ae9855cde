"""What tests comparing two runs' metrics leave out: what the clock sets, not the training."""

from __future__ import annotations

#: Prefixes of metrics measured by the clock (timings, throughput, MFU): they differ between
#: two runs that are otherwise equal to the last bit.
CLOCK_METRICS = ("timing/", "tokens_per_s", "mfu")


def is_clock_metric(key: str) -> bool:
    return key.startswith(CLOCK_METRICS)
