"""Which process of a command's tree peaks: run the command, read every process's high-water RSS (the kernel's VmHWM)
every 0.2 s, print the largest peaks with their command lines and when they were last seen rising. ru_maxrss (what
benchmarks/curate_1m.py reports) gives the largest process's peak but not which process it was.

    python benchmarks/peak_by_process.py python benchmarks/curate_1m.py --n 3000000

The command's own output goes to peak_by_process.out in the current folder. A process's
peak is missed only if it rises in the last 0.2 s before it exits.
"""

from __future__ import annotations

import subprocess
import sys
import time

import psutil


def _high_water(pid: int) -> int:
    """The process's peak RSS so far as the kernel counts it (VmHWM): a spike between two samples is not missed."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no VmHWM for {pid}")


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        raise SystemExit(__doc__)
    with open("peak_by_process.out", "w") as out:
        proc = subprocess.Popen(sys.argv[1:], stdout=out, stderr=subprocess.STDOUT)
        root = psutil.Process(proc.pid)
        peaks: dict[int, tuple[int, str, float]] = {}
        t0 = time.time()
        while proc.poll() is None:
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            for p in procs:
                try:
                    rss, cmd = _high_water(p.pid), " ".join(p.cmdline())[-120:]
                except (psutil.Error, OSError):  # ended between the listing and the reading
                    continue
                if rss > peaks.get(p.pid, (0, "", 0.0))[0]:
                    peaks[p.pid] = (rss, cmd, time.time() - t0)
            time.sleep(0.2)
    print(f"exit status {proc.returncode}; largest sampled peaks:")
    for pid, (rss, cmd, t) in sorted(peaks.items(), key=lambda kv: -kv[1][0])[:8]:
        print(f"{pid:>8} {rss / 2**30:5.2f} GiB at {t:6.0f} s  {cmd}")


if __name__ == "__main__":
    main()
