"""``cycles_flow``: iterative pretrain -> filter -> retrain rounds, and the nightly flow.

Round k+1 fine-tunes its captioner and filter from the latest promoted round's retrained model
(the quality gate, :mod:`vlp_core.promotion`: a rejected round is never a source), re-captions and
re-filters the same web shards, retrains and records version ``round<k+1>``.  Finished
rounds are skipped by the stage cache, so ``vlp cycles --rounds 3`` after a 2-round run only
runs round 2.  After the last round the HTML report is written to ``report/index.html``.

``nightly_flow`` is what ``vlp deploy`` schedules: an incremental ingest of a (growing) web
URL list, then CapFilt of the new shards with the latest promoted round's captioner and filter.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from prefect import flow
from prefect.artifacts import create_link_artifact

from flows import tasks as T
from flows.bootstrap import _artifacts, _capfilt_fanout, _logger, in_root, open_workdir, run_round, task_runner_for
from vlp_core import promotion as P
from vlp_core import rounds as R
from vlp_core.catalog import CatalogError
from vlp_core.layout import resolve
from vlp_core.report import write_report
from vlp_core.stagecache import marker_key


def write_report_if_possible(params, layout: T.Layout) -> Optional[Path]:

    cat = layout.root / params.catalog.path
    if not cat.exists():
        return None
    try:
        report = write_report(cat, layout.report, base_dir=layout.root)
    except CatalogError as exc:
        _logger().warning("report not written: %s", exc)
        return None
    try:  # a link artifact to the report (artifacts are a nicety: never fail a finished run for one)
        create_link_artifact(key="vlp-report", link=report.resolve().as_uri(), link_text="vlp report (HTML)",
                             description="histograms, kept ratio by source, metrics across rounds, samples")
    except Exception as exc:  # noqa: BLE001
        _logger().warning("could not create the report artifact: %s", exc)
    return report


@flow(name="vlp-cycles", log_prints=True)
def cycles_flow(rounds: Optional[int] = None, params_path: str = "params.yaml", overrides: Sequence[str] = (),
                workdir: str = ".", init_from: Optional[str] = None, start_round: int = 0) -> dict:
    """Run rounds ``start_round .. rounds-1`` (default ``orchestration.rounds``)."""
    layout, params = open_workdir(workdir, params_path, overrides)
    n = params.orchestration.rounds if rounds is None else rounds
    out: dict[str, Any] = {}
    for k in range(start_round, n):
        # init_from: round 0's start, and later rounds' when no round is promoted
        out[f"round{k}"] = run_round(params, layout, k, in_root(layout, init_from),
                                     overridden=T.tracked_overrides(overrides))
    report = write_report_if_possible(params, layout)
    out["report"] = str(report) if report else None
    return out


def run_cycles(rounds: Optional[int] = None, params_path: str = "params.yaml", overrides: Sequence[str] = (),
               workdir: str = ".", init_from: Optional[str] = None, start_round: int = 0) -> dict:
    """Validate params, pick the task runner from them, and run :func:`cycles_flow`."""
    layout, params = open_workdir(workdir, params_path, overrides)
    f = cycles_flow.with_options(task_runner=task_runner_for(params))
    return f(rounds=rounds, params_path=str(resolve(params_path, layout.root)), overrides=tuple(overrides),
             workdir=str(layout.root), init_from=in_root(layout, init_from), start_round=start_round)


@flow(name="vlp-nightly", log_prints=True)
def nightly_flow(params_path: str = "params.yaml", workdir: str = ".", overrides: Sequence[str] = ()) -> dict:
    """Incremental ingest of ``data/urls/web.parquet``, then CapFilt of the new shards into
    the latest promoted round's corpus (when a promoted round with a filter -- and its captioner,
    when the round has one (``capfilt.captioner``) -- exists).
    ``overrides`` are ``-S`` settings (``vlp deploy -S ...`` stores them in the deployment)."""
    layout, params = open_workdir(workdir, params_path, overrides)
    web = R.ingest_step(params, layout, "web")
    res: dict[str, Any] = {"ingest_web": T.unwrap(T.step_task(params, web)(params, layout, web, []))}
    done = set(layout.rounds_done())  # rounds with a filter, and a captioner unless they run without one
    k = P.latest_promoted_round(layout, lambda j: j in done)
    if k is None or not layout.ingest("human").exists():
        _logger().info("no promoted round with a finished filter (and captioner) yet: ingest only (run `vlp cycles` first)")
        return res
    base = R.base_step(layout, k) if k else R.pretrain_step(params, layout)
    capfilt = next(s for s in R.round_steps(params, layout, k, base, until="capfilt", record=False)
                   if s.name == "capfilt")
    # the fine-tunes are not rerun: their stage cache keys stand for them
    known = {web.id: res["ingest_web"],
             "ingest_human": R.run_step(params, layout, R.given_ingest(layout, "human"), [])}
    for sid in capfilt.needs:  # the round's fine-tunes: the filter, and the captioner when it has one
        if sid not in known:
            name = sid.split("-", 1)[1]
            known[sid] = res[name] = {"key": marker_key(layout, sid) or "none", "skipped": True, "stats": {}}
    upstream = [known[n] for n in capfilt.needs]
    _capfilt_fanout(params, layout, capfilt, upstream)
    res["capfilt"] = T.unwrap(T.step_task(params, capfilt)(params, layout, capfilt, upstream))
    _artifacts(params, layout, k, res)
    return res


__all__ = ["cycles_flow", "nightly_flow", "run_cycles", "write_report_if_possible"]
