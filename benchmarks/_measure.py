"""Shared by the benchmark scripts: memory of a side's whole process tree."""

from __future__ import annotations

import psutil


def tree_pss(root: psutil.Process) -> int:
    """Proportional set size of ``root`` and all its descendants, in bytes (forked workers' shared pages count once).

    A process that exits while being read is skipped; 0 if the tree cannot be listed any more.
    """
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
        except psutil.Error:
            pass
    return total
