"""``vlp demo``: the synthetic web, served on 127.0.0.1, bootstrapped through the cycles.

1. ``synthetic`` makes the seeded world in ``data/world`` (a cached stage, DVC-committed);
2. the world is served on ``127.0.0.1:<port>`` and the URL lists ``data/urls/<split>.parquet``
   are written for that base URL (a fixed port keeps them, and so DVC's inputs, stable);
3. the rounds run as in :func:`flows.cycles.cycles_flow`, then the report is written.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from prefect import flow, task
from prefect.cache_policies import NONE

from flows import tasks as T
from flows.bootstrap import in_workdir, run_round, task_runner_for
from flows.cycles import write_report_if_possible
from vlp_core.config import Params, load_params


@task(name="synthetic", cache_policy=NONE)
def synthetic_task(params: Params, layout: T.Layout) -> dict[str, Any]:
    """Make the synthetic world (skipped when unchanged)."""
    from vlp_core.synthetic.make import run_synthetic_make

    return T.cached_stage(params, layout, "synthetic", None, layout.world, ["synthetic"], [], [],
                          lambda: run_synthetic_make(params, layout.world), done_file="ground_truth.parquet")


def write_urls_if_changed(layout: T.Layout, base_url: str) -> None:
    """Write ``data/urls/<split>.parquet``, leaving a file untouched when its bytes would not change."""
    from vlp_core.synthetic.server import write_url_list

    for split in T.SPLITS:
        target = layout.urls(split)
        tmp = target.with_name(f".{target.name}.new")
        target.parent.mkdir(parents=True, exist_ok=True)
        write_url_list(layout.world, split, base_url, tmp)
        if target.exists() and T.digest_path(target) == T.digest_path(tmp):
            tmp.unlink()
        else:
            tmp.replace(target)


@flow(name="vlp-demo", log_prints=True)
def demo_flow(params_path: str = "params.yaml", overrides: Sequence[str] = (), workdir: str = ".",
              rounds: Optional[int] = None, port: int = 8765) -> dict:
    from vlp_core import versioning as V
    from vlp_core.synthetic.server import serve_world

    with in_workdir(workdir):
        params = load_params(params_path, list(overrides))
        layout = T.Layout(Path("."), home=str(Path.cwd()))
        out: dict[str, Any] = {"synthetic": synthetic_task(params, layout)}
        if V.is_dvc_repo(".") and params.orchestration.dvc_commit and not T.tracked_overrides(overrides):
            V.dvc_commit(".", ["synthetic"])
        n = params.orchestration.rounds if rounds is None else rounds
        with serve_world(layout.world, port=port) as srv:
            write_urls_if_changed(layout, srv.base_url)
            for k in range(n):
                out[f"round{k}"] = run_round(params, layout, k, overridden=T.tracked_overrides(overrides))
        report = write_report_if_possible(params, layout)
        out["report"] = str(report) if report else None
        return out


def run_demo(params_path: str = "params.yaml", overrides: Sequence[str] = (), workdir: str = ".",
             rounds: Optional[int] = None, port: int = 8765) -> dict:
    with in_workdir(workdir):
        params = load_params(params_path, list(overrides))
        f = demo_flow.with_options(task_runner=task_runner_for(params))
        return f(params_path=params_path, overrides=tuple(overrides), workdir=".", rounds=rounds, port=port)


__all__ = ["demo_flow", "run_demo", "synthetic_task", "write_urls_if_changed"]
