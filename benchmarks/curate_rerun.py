"""Curation re-run after changing one source's mix weight: first run vs rerun (per-source and dedup caches).

usage: python benchmarks/curate_rerun.py [--tasks N] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time

from sft_engine.config import load_config
from sft_engine.curation import stage as curation


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tasks", type=int, default=200_000, help="verifiable-task rows beside all chitchat windows")
    p.add_argument("--work", default="/tmp/sft_curate_rerun")
    a = p.parse_args()
    shutil.rmtree(a.work, ignore_errors=True)
    base = [f"work_dir={a.work}", f"curate.sources=[{{name: chat, builtin: chitchat}}, {{name: tasks, builtin: verifiable_tasks, limit: {a.tasks}}}]"]
    t = time.perf_counter()
    first = curation.run_curate(load_config(None, base))
    t_first = time.perf_counter() - t
    t = time.perf_counter()
    again = curation.run_curate(load_config(None, [*base, "curate.sources.1.weight=0.5"]))
    t_again = time.perf_counter() - t
    s1 = json.loads((first.path / "stats.json").read_text())
    s2 = json.loads((again.path / "stats.json").read_text())
    print(f"rows_in={s1['rows_in']}  first run {t_first:.2f} s  after reweighting {t_again:.2f} s  speedup {t_first / t_again:.1f}x")
    print(f"cache on rerun: {s2['cache']}")
    print(f"dropped: {s1['dropped_by_reason']}")


if __name__ == "__main__":
    main()
