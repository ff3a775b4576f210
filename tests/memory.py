"""Peak memory of this test process, measured honestly (Linux /proc).

`ru_maxrss` is the peak over the process's whole life, so an earlier, larger test
would hide a regression. Writing 5 to /proc/self/clear_refs resets the peak
(VmHWM) to the current RSS, so the growth measured is this test's alone.
"""

from __future__ import annotations

import re
from pathlib import Path


def _status_kib(field: str) -> int:
    match = re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text())
    assert match is not None, f"{field} missing from /proc/self/status"
    return int(match.group(1))


def reset_peak_rss() -> int:
    """Reset the process's peak RSS to its current RSS; returns that, in KiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS")


def peak_rss_growth_kib(baseline_kib: int) -> int:
    """How far the peak RSS rose above ``baseline_kib`` since the reset."""
    return _status_kib("VmHWM") - baseline_kib
