"""``bootstrap_flow``: one CapFilt round, every task one call into ``vlp_core``.

    ingest (web, human, test; retried, with a timeout) -> pretrain (round 0; or an imported
    checkpoint) -> finetune captioner + filter -> capfilt (fanned out over shards) ->
    features -> retrain -> evaluate -> gate -> record -> dvc commit
    (+ for a promoted round: git tag round-N, dvc push)

The gate (:mod:`vlp_core.promotion`) judges the round against its parent before any side effect: a
rejected round is recorded (state ``rejected`` and why) but not tagged, and never becomes a
source.  Round k > 0 fine-tunes its captioner and filter from the latest promoted round's
retrained model (round 0's pretrained model when none is promoted).  Unchanged
stages are skipped and a failed run resumes (see :mod:`flows.tasks` for the stage cache).
Params are loaded by :func:`vlp_core.config.load_params`, as in the CLI.  The default task
runner is Prefect's thread pool on the ephemeral API; ``orchestration.task_runner: dask``
runs the same tasks on a Dask cluster (``dask_address``, or a local one with
``dask_workers`` workers): use :func:`run_bootstrap` (or ``vlp run``), which picks the runner
from params before the flow starts.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE
from prefect.utilities.annotations import unmapped

from flows import tasks as T
from vlp_core import rounds as R
from vlp_core import promotion as P
from vlp_core import catalog
from vlp_core import versioning as V
from vlp_core.capfilt import stage as cs
from vlp_core.catalog import flatten_metrics
from vlp_core.config import Params, load_params
from vlp_core.io import read_json
from vlp_core.layout import resolve
from vlp_core.rounds import STEPS
from vlp_core.stagecache import is_cached



def open_workdir(workdir: str | Path, params_path: str | Path, overrides: Sequence[str]) -> tuple[T.Layout, Params]:
    """The layout of ``workdir`` (its root made absolute once, here: every stage path and shard
    reference below is resolved against it, never against the current folder, so no task needs
    ``os.chdir``) and its settings (``params_path`` relative to ``workdir``, as under DVC)."""
    layout = T.Layout.at(workdir)
    return layout, load_params(str(resolve(params_path, layout.root)), list(overrides))


def in_root(layout: T.Layout, path: Optional[str | Path]) -> Optional[str]:
    """A path the caller gave relative to the work dir (``--init-from``), as an absolute one."""
    return None if path is None else str(resolve(path, layout.root))


def task_runner_for(params: Params):
    """Prefect's thread pool, or prefect-dask's DaskTaskRunner when params say dask."""
    o = params.orchestration
    if o.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if o.dask_address:
            return DaskTaskRunner(address=o.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": o.dask_workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    import torch
    from prefect.task_runners import ThreadPoolTaskRunner

    # On a CPU, tasks that run torch in threads of one process share its thread pool: two at once
    # oversubscribe the cores (measured: 3x slower than one after the other on 2 cores).
    workers = max(1, o.dask_workers) if torch.cuda.is_available() else 1
    return ThreadPoolTaskRunner(max_workers=workers)


def _logger():
    try:
        return get_run_logger()
    except Exception:  # outside a run (tests calling helpers directly)
        return logging.getLogger("vlp.flows")


@task(name="version", task_run_name="version-round{round}", cache_policy=NONE)
def version_task(params: Params, layout: T.Layout, round: int, dvc_stages: Sequence[str], complete: bool,
                 overridden: bool, promoted: bool = True, held: Sequence[str] = ()) -> dict[str, Any]:
    """Record the stages this round ran in dvc.lock (``dvc commit``; not those in ``held``, see
    :func:`vlp_core.promotion.dvc_held_stages`), then -- for a complete round the gate promoted --
    commit dvc.lock with the evaluation metrics and loss logs (:meth:`Layout.git_files`), tag
    ``round-N`` and optionally ``dvc push``.  A rejected round gets none of these last three.
    Then the round's catalog version gets the revision and ``dvc.lock`` hashes it now has."""

    o = params.orchestration
    done: dict[str, Any] = {"dvc_committed": [], "tag": None, "pushed": False, "promoted": complete and promoted}
    log = _logger()
    if complete and not promoted:
        log.warning("round %d was rejected by the gate: not tagged, not pushed", round)
    if not V.is_dvc_repo(layout.root):
        return done
    if overridden:
        log.warning("settings were overridden (-S): not recording them in dvc.lock, which tracks params.yaml")
        return done
    if o.dvc_commit:
        known = set(V.dvc_stage_names(layout.root))
        stages = [s for s in dvc_stages if s in known and s not in held]
        if held:
            log.warning("round %d started from another model than dvc.yaml's round%d items name (the gate rejected "
                        "a round before it): not recording %s in dvc.lock", round, round, ", ".join(held))
        V.dvc_commit(layout.root, stages)
        done["dvc_committed"] = stages
    complete = complete and promoted
    if complete and o.dvc_push and V.dvc(["remote", "default"], layout.root, check=False).returncode != 0:
        V.ensure_local_remote(layout.root, o.dvc_remote_url)  # no default remote yet: a local directory
    if complete and o.git_tag and V.is_git_repo(layout.root):
        done["tag"] = f"round-{round}"
        # the evaluation metrics and loss logs are DVC metrics / plots with cache: false: git holds
        # them, so `dvc metrics diff round-0 round-1`, `dvc plots diff` and `dvc exp show` read them
        small = [str(f.relative_to(layout.root)) for f in layout.git_files(round)]
        done["commit"] = V.git_commit_and_tag(layout.root, f"vlp: round {round} ({len(dvc_stages)} stages)",
                                              tag=done["tag"], paths=["dvc.lock", ".dvc/config", ".gitignore"],
                                              force=small)
        done["git_files"] = small
    if done["dvc_committed"] or done["tag"]:
        done["catalog_revision"] = _update_catalog_revision(params, layout, round)
    if complete and o.dvc_push:
        V.dvc_push(layout.root)
        done["pushed"] = True
    return done


def _update_catalog_revision(params: Params, layout: T.Layout, round: int) -> Optional[str]:
    """Store the revision and ``dvc.lock`` hashes the round now has on its catalog version (it
    was recorded before ``dvc commit`` and the tag); None when the round was not recorded."""
    name = catalog.version_name(f"round{round}")
    path = layout.root / params.catalog.path
    if not path.exists():
        return None
    try:
        rev, n = catalog.update_version_revision(path, name, layout.root)
    except catalog.CatalogError as exc:
        _logger().warning("catalog revision of %s not updated: %s", name, exc)
        return None
    _logger().info("catalog version %s: git %s, DVC hashes of %d stages", name, rev or "-", n)
    return rev


def run_round(params: Params, layout: T.Layout, round: int = 0, init_from: Optional[str] = None,
              until: Optional[str] = None, overridden: bool = False) -> dict[str, Any]:
    """The body of one round (inside a flow run): the steps :func:`vlp_core.rounds.compose` lists,
    each a Prefect task, then the DVC commit and tag.  Returns the results by stage name."""
    log = _logger()
    # round k > 0 starts from the latest promoted round's retrained model (a rejected round is never a source)
    base_model = str(P.source_model(layout, round, init_from)) if round > 0 else None
    steps = R.compose(params, layout, round, init_from, until, base_model=base_model)
    by_id: dict[str, dict] = {}
    res: dict[str, dict] = {}
    # the two fine-tunes run side by side only on a Dask cluster: two trainings in one process's
    # threads share (and oversubscribe) its torch thread pool -- on 2 CPU cores they took 3x longer
    # together than one after the other
    together = params.orchestration.task_runner == "dask"
    pending: dict[str, Any] = {}
    for step in steps:
        upstream = []
        for n in step.needs:
            if n in pending:
                by_id[n] = pending.pop(n).result()
            upstream.append(by_id[n])
        if step.name == "capfilt":
            _capfilt_fanout(params, layout, step, upstream)
        run = T.step_task(params, step)
        if together and step.name.startswith("finetune_"):
            pending[step.id] = run.submit(params, layout, step, upstream)
            continue
        by_id[step.id] = T.unwrap(run(params, layout, step, upstream))
    for n, fut in pending.items():
        by_id[n] = fut.result()
    for step in steps:
        res[step.name] = by_id[step.id]
    dvc_stages = [s.dvc_name for s in steps if not s.given and s.in_dvc]
    complete = not R.after("record", until)
    if "gate" in res:
        log.info("round %d %s by the gate: %s", round, res["gate"]["state"], res["gate"]["reason"])
    res["version"] = version_task(params, layout, round, dvc_stages, complete, overridden,
                                  promoted=bool(res.get("gate", {}).get("promoted")),
                                  held=P.dvc_held_stages(layout, round, base_model, dvc_stages))
    ran = [k for k, v in res.items() if isinstance(v, dict) and v.get("skipped") is False]
    log.info("round %d: ran %s; skipped the rest", round, ", ".join(ran) or "nothing")
    _artifacts(params, layout, round, res)
    return res


def _capfilt_fanout(params: Params, layout: T.Layout, step: R.Step, upstream: list[dict]) -> list[Any]:
    """Map CapFilt over the web shards (one task per shard) unless the stage cache will skip the
    step; the capfilt step itself then only gathers (finished shards are skipped by done marker)."""

    key = T.input_key(step.id, params, step.sections, upstream, step.files)
    if is_cached(params, layout, step.id, key, step.out_dir, step.done_file):
        return []
    if params.orchestration.fail_before == "capfilt":
        return []  # let the capfilt step raise the injected failure
    round = step.round
    shards = list(cs.list_capfilt_shards(params, layout.manifest("web")))
    calibration = cs.calibrate_threshold(params, str(layout.model(round, "finetune_filter")),
                                         layout.manifest("human"), layout.stage(round, "capfilt"), root=layout.root)
    futures = T.capfilt_shard_task.map(  # the settings are a pydantic model, iterable: unmapped, not mapped
        unmapped(params), layout, round, shards, step.meta.get("captioner"),
        str(layout.model(round, "finetune_filter")), unmapped(calibration))
    return [f.result() for f in futures]


def _artifacts(params: Params, layout: T.Layout, round: int, res: dict[str, Any]) -> None:
    """The round's artifacts: table artifacts of its stage stats (``round-<k>-stages``) and its
    evaluation metrics (``round-<k>-metrics``), and a markdown summary (gate, DVC, report)."""
    rows = [{"stage": name, "state": "cached" if r.get("skipped") else "ran",
             "rows in": (r.get("stats") or {}).get("rows_in", ""), "rows out": (r.get("stats") or {}).get("rows_out", ""),
             "seconds": round_((r.get("stats") or {}).get("seconds"))}
            for name, r in res.items() if isinstance(r, dict) and "stats" in r]
    metrics_file = layout.stage(round, "evaluate") / "metrics.json"
    metrics = ([{"metric": k, "value": round_(v)} for k, v in sorted(flatten_metrics(read_json(metrics_file)).items())]
               if metrics_file.exists() else [])
    lines = [f"vlp round {round}: {sum(r['state'] == 'ran' for r in rows)} stages ran, "
             f"{sum(r['state'] == 'cached' for r in rows)} cached (table `round-{round}-stages`)"]
    version = res.get("version") or {}
    if res.get("gate"):
        lines += ["", f"Gate: **{res['gate']['state']}** -- {res['gate']['reason']}"]
    lines += ["", f"DVC stages committed: {', '.join(version.get('dvc_committed', [])) or 'none'}; "
              f"tag: {version.get('tag') or 'none'}",
              f"Report: `{layout.report.resolve()}` (write it with `vlp report --out {layout.report}`)"]
    try:
        create_table_artifact(key=f"round-{round}-stages", table=rows, description=f"vlp round {round}: stage stats")
        if metrics:
            create_table_artifact(key=f"round-{round}-metrics", table=metrics,
                                  description=f"vlp round {round}: evaluation of its retrained model")
        create_markdown_artifact(key=f"round-{round}-summary", markdown="\n".join(lines),
                                 description=f"vlp round {round}: gate, DVC, report")
    except Exception as exc:  # artifacts are a nicety: never fail a finished round for one
        _logger().warning("could not create the round %d artifacts: %s", round, exc)


def round_(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))


@flow(name="vlp-bootstrap", log_prints=True)
def bootstrap_flow(params_path: str = "params.yaml", overrides: Sequence[str] = (), round: int = 0,
                   workdir: str = ".", init_from: Optional[str] = None, until: Optional[str] = None) -> dict:
    """One round of the bootstrap (see the module doc).  ``init_from`` replaces round 0's
    pretraining with an imported checkpoint; ``until`` stops after that step."""
    layout, params = open_workdir(workdir, params_path, overrides)
    return run_round(params, layout, round, in_root(layout, init_from), until,
                     overridden=T.tracked_overrides(overrides))


def run_bootstrap(params_path: str = "params.yaml", overrides: Sequence[str] = (), round: int = 0,
                  workdir: str = ".", init_from: Optional[str] = None, until: Optional[str] = None) -> dict:
    """Validate params, pick the task runner from them, and run :func:`bootstrap_flow`."""
    layout, params = open_workdir(workdir, params_path, overrides)
    f = bootstrap_flow.with_options(task_runner=task_runner_for(params))
    return f(params_path=str(resolve(params_path, layout.root)), overrides=tuple(overrides), round=round,
             workdir=str(layout.root), init_from=in_root(layout, init_from), until=until)


__all__ = ["STEPS", "bootstrap_flow", "in_root", "open_workdir", "run_bootstrap", "run_round", "task_runner_for", "version_task"]
