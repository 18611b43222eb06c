"""The Prefect task runner that curation's per-shard tasks are mapped over (``runner:`` in the config).

    sequential  no mapping: the curate task runs every unit itself, as a plain function call
    threads     ThreadPoolTaskRunner(workers)             (Polars releases the GIL on its hot paths)
    dask        DaskTaskRunner: a local cluster of `workers` processes, or the scheduler at `address`
    ray         RayTaskRunner: local Ray with `workers` CPUs, or the cluster at `address`

A local Dask cluster starts worker processes that re-import the entry script, so a script that runs
the flow keeps its entry under ``if __name__ == "__main__":`` (the ``sft-pipeline`` command does);
without it Dask fails with "Nanny failed to start".
"""

from __future__ import annotations

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from sft_engine.config import RunnerConfig


def task_runner(cfg: RunnerConfig) -> TaskRunner:
    """A fresh task runner for ``cfg.kind`` (not for ``sequential``, which maps nothing)."""
    if cfg.kind == "threads":
        return ThreadPoolTaskRunner(max_workers=cfg.workers)
    if cfg.kind == "dask":
        from prefect_dask import DaskTaskRunner

        if cfg.address:
            return DaskTaskRunner(address=cfg.address)
        # One thread per worker process: each unit already uses Polars' own thread pool.
        return DaskTaskRunner(cluster_kwargs={"n_workers": cfg.workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None})
    if cfg.kind == "ray":
        from prefect_ray import RayTaskRunner

        if cfg.address:
            return RayTaskRunner(address=cfg.address)
        return RayTaskRunner(init_kwargs={"num_cpus": cfg.workers, "include_dashboard": False})
    raise ValueError(f"runner.kind={cfg.kind} maps nothing; use runner.kind=threads, dask or ray to get a task runner")
