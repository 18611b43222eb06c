"""Curation through the CLI on each runner (``runner.kind``), same data, one table; outputs compared byte for byte.

Uses the shards ``benchmarks/curate_1m.py`` generates (``--data``, default /tmp/sft_curate_200000: run
``python benchmarks/curate_1m.py --n 200000`` once first). Each runner curates into a fresh work dir with
``sft-pipeline curate`` (Prefect flow, MLflow tracking, ephemeral Prefect server: the same fixed costs for every
runner), one after another. Printed per runner: wall seconds of the command, CPU seconds of its process tree
(user + system, waited-for children included), CPU s / wall, and whether train / heldout / rejected Parquet are
byte-identical to the first runner's.

    python benchmarks/curate_runners.py                                   # sequential, processes, threads, dask
    python benchmarks/curate_runners.py --kinds sequential processes      # a subset
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUTPUTS = ("train.parquet", "heldout.parquet", "rejected.parquet")


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for name in OUTPUTS:
        h.update((folder / name).read_bytes())
    return h.hexdigest()[:16]


def run(kind: str, data: Path, workers: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"curate_{kind}_"))
    cli = Path(sys.executable).with_name("sft-pipeline")
    cmd = [
        str(cli), "curate", f"work_dir={work}", "experiment=curate-runners",
        "curate.sources=[{name: chat, path: '" + str(data / "chat-*.jsonl") + "'}, {name: sharegpt, path: '"
        + str(data / "sharegpt-*.parquet") + "'}]",
        "curate.max_chars=40000", f"runner.kind={kind}", f"runner.workers={workers}",
    ]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    out = proc.stdout.read() if proc.stdout else ""
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"runner.kind={kind} failed:\n{out[-3000:]}")
    folder = next((work / "curate").glob("*/train.parquet")).parent
    result = {"kind": kind, "wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "digest": digest(folder)}
    shutil.rmtree(work, ignore_errors=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="/tmp/sft_curate_200000", help="shards from benchmarks/curate_1m.py")
    p.add_argument("--kinds", nargs="+", default=["sequential", "processes", "threads", "dask"])
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    data = Path(args.data)
    if not (data / "_generated.json").exists():
        sys.exit(f"no generated shards in {data}: run python benchmarks/curate_1m.py --n 200000 first")
    rows = []
    for kind in args.kinds:
        rows.append(run(kind, data, args.workers))
        r = rows[-1]
        print(f"{kind}: {r['wall']:.1f} s wall, {r['cpu']:.0f} CPU s, outputs {r['digest']}", flush=True)
    base = rows[0]
    print(f"\n| runner.kind (workers {args.workers}) | wall s | x {base['kind']} | CPU s | CPU s / wall | outputs = {base['kind']}'s |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['wall']:.1f} | {base['wall'] / r['wall']:.2f} | {r['cpu']:.0f} | {r['cpu'] / r['wall']:.2f} | "
              f"{'identical' if r['digest'] == base['digest'] else 'DIFFERENT'} |")


if __name__ == "__main__":
    main()
