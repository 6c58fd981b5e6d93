"""A progress bar on stderr (tqdm when installed, else a plain line every few percent)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, desc: str, enabled: bool = True, unit: str = "B"):
        self.total, self.desc, self.enabled, self.done = max(total, 1), desc, enabled, 0
        self.bar = None
        self.last_pct = -10
        self.start = time.time()
        if not enabled:
            return
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=1024,
                            file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
        except ImportError:
            pass

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            return
        pct = int(100 * self.done / self.total)
        if pct >= self.last_pct + 10 or self.done >= self.total:
            self.last_pct = pct
            print(f"{self.desc}: {pct}% ({self.done / 2**20:.0f} MiB, {time.time() - self.start:.0f} s)",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def peak_rss_gib() -> float:
    """This process's peak resident set size. Linux's VmHWM belongs to the address space, which
    exec replaces, so unlike ru_maxrss it does not start at the parent's RSS at fork time."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
