"""``vlp demo``: the synthetic web, served on 127.0.0.1, bootstrapped through the cycles.

0. :func:`prepare_demo_repo` makes the demo's own git + DVC repo (``demo/`` by default):
   ``params.yaml`` is the platform's ``params.yaml`` with the demo's settings
   (``flows/demo.yaml``: a one-object world, CPU-sized budgets, ``retrain.init: continue``)
   laid over it, ``dvc.yaml`` is the project's, and ``vlp_core`` links to the code (DVC's code
   dependencies).  DVC then records exactly the settings the demo ran with;
1. ``synthetic`` makes the seeded world in ``data/world`` (a cached stage, DVC-committed);
2. the world is served on ``127.0.0.1:<port>`` and the URL lists ``data/urls/<split>.parquet``
   are written for that base URL (a fixed port keeps them, and so DVC's inputs, stable);
3. the rounds run as in :func:`flows.cycles.cycles_flow`, then the report is written;
4. the controls (filter-only, human-only, oracle; and "raw web", the pretrained model trained on
   the raw web for the same steps, when ``retrain.init`` is continue) are trained like round 0's
   retrain, and the
   comparison table (:mod:`vlp_core.comparison`) is written to ``data/comparison/table.md`` and
   printed.

Model names in the table: "pretrained" is round 0's base model, pretrained on the raw web
(``data/round0/pretrain``); "round k" is round k's model, retrained on CapFilt version
``round<k>``'s corpus (``data/round<k>/retrain``) -- round k as everywhere (:mod:`vlp_core.layout`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE

import yaml

from flows import tasks as T
from flows.bootstrap import open_workdir, run_round, task_runner_for
from flows.cycles import write_report_if_possible
from vlp_core import versioning as V
from vlp_core.comparison import (comparison_table, inputs_of, results_from_json, results_to_json, round_results,
                                 run_controls, table_rows)
from vlp_core.config import ConfigError, Params, params_from_dict
from vlp_core.io import read_json, write_json, write_text
from vlp_core.synthetic.make import run_synthetic_make
from vlp_core.synthetic.server import serve_world, write_url_list


PROJECT = Path(__file__).resolve().parents[1]
DEMO_SETTINGS = Path(__file__).with_name("demo.yaml")
# git ignores the data (DVC's cache holds it) but for the small files DVC reads from git: each
# stage's metrics.json (evaluation) and loss.csv (training), `cache: false` metrics and plots --
# `dvc metrics diff round-0 round-1`, `dvc plots diff` and `dvc exp show` (an experiment's commit
# holds only what git does not ignore) read them from the revisions
DEMO_GITIGNORE = ("/data/*\n!/data/.gitignore\n!/data/round*/\n/data/round*/*\n!/data/round*/*/\n/data/round*/*/*\n"
                  "!/data/round*/*/metrics.json\n!/data/round*/*/loss.csv\n"
                  "/report/\n/dvc_plots/\n__pycache__/\n*.duckdb\n*.duckdb.wal\n.prefect/\n")
# what older demos wrote: it hid the metrics and plots from git (rewritten by prepare_demo_repo)
OLD_DEMO_GITIGNORES = ("/data/*\n!/data/.gitignore\n/report/\n/dvc_plots/\n__pycache__/\n*.duckdb\n*.duckdb.wal\n"
                       ".prefect/\n",)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def demo_params_text(base_params: str | Path = PROJECT / "params.yaml", settings: str | Path = DEMO_SETTINGS) -> str:
    """The demo's ``params.yaml``: ``base_params`` with ``settings`` laid over it (validated)."""

    base = yaml.safe_load(Path(base_params).read_text()) or {}
    merged = _merge(base, yaml.safe_load(Path(settings).read_text()) or {})
    params_from_dict(merged, str(settings))  # unknown keys / wrong types: one line naming the file
    head = (f"# Written by `vlp demo`: {Path(base_params).name} with the demo's settings ({Path(settings).name}) laid\n"
            "# over it.  Edit it to change the demo (delete it to have it written again).\n")
    return head + yaml.safe_dump(merged, sort_keys=False)


def prepare_demo_repo(workdir: str | Path, base_params: str | Path = PROJECT / "params.yaml") -> Path:
    """Make ``workdir`` the demo's own git + DVC repo (idempotent) and return it.

    Writes ``params.yaml`` (:func:`demo_params_text`) unless one exists (from an older version it
    only drops ``ingest.allow_private_network``, replaced by the server the demo allows itself), copies the project's
    ``dvc.yaml``, links ``vlp_core`` to the project's code (the stages' code dependencies),
    writes ``.gitignore`` (:data:`DEMO_GITIGNORE`: the data, but not the evaluation metrics and
    loss logs, which DVC reads from git; an older demo's is replaced),
    and runs ``git init`` + ``dvc init`` + a first commit the first time."""

    root = Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    params = root / "params.yaml"
    if not params.exists():
        params.write_text(demo_params_text(base_params))
    elif "allow_private_network:" in params.read_text():  # an older demo's: the demo now allows its server itself
        params.write_text("".join(ln for ln in params.read_text().splitlines(keepends=True)
                                  if "allow_private_network:" not in ln))
    dvc_yaml = (PROJECT / "dvc.yaml").read_text()
    if not (root / "dvc.yaml").exists() or (root / "dvc.yaml").read_text() != dvc_yaml:
        (root / "dvc.yaml").write_text(dvc_yaml)
    link = root / "vlp_core"
    if not link.exists() and not link.is_symlink():
        link.symlink_to(os.path.relpath(PROJECT / "vlp_core", root.resolve()))
    gitignore = root / ".gitignore"
    if not gitignore.exists() or gitignore.read_text() in OLD_DEMO_GITIGNORES:
        gitignore.write_text(DEMO_GITIGNORE)
    if not (root / ".git").exists():
        V.git(["init", "-q"], root)
    for key, value in (("user.name", "vlp demo"), ("user.email", "vlp-demo@localhost")):
        if V.git(["config", key], root, check=False).returncode != 0:
            V.git(["config", key, value], root)
    if not V.is_dvc_repo(root):
        V.dvc(["init", "-q"], root)
    if V.git(["rev-parse", "--verify", "HEAD"], root, check=False).returncode != 0:
        V.git(["add", "."], root)
        V.git(["commit", "-q", "-m", "vlp demo: params, pipeline"], root)
    return root


@task(name="synthetic", cache_policy=NONE)
def synthetic_task(params: Params, layout: T.Layout) -> Any:
    """Make the synthetic world (skipped when unchanged)."""

    return T.as_state(T.cached_stage(params, layout, "synthetic", None, layout.world, ["synthetic"], [], [],
                                     lambda: run_synthetic_make(params, layout.world), done_file="ground_truth.parquet"))


def write_urls_if_changed(layout: T.Layout, base_url: str) -> None:
    """Write ``data/urls/<split>.parquet``, leaving a file untouched when its bytes would not change."""

    for split in T.SPLITS:
        target = layout.urls(split)
        tmp = target.with_name(f".{target.name}.new")
        target.parent.mkdir(parents=True, exist_ok=True)
        write_url_list(layout.world, split, base_url, tmp)
        if target.exists() and T.digest_path(target) == T.digest_path(tmp):
            tmp.unlink()
        else:
            tmp.replace(target)


def allow_server(params: Params, host_port: str) -> Params:
    """``params`` that may download from the demo's own server (``127.0.0.1:PORT``), the one host
    not on the public network that the demo contacts."""
    allowed = tuple(params.ingest.allowed_hosts)
    return params if host_port in allowed else params.replace(**{"ingest.allowed_hosts": allowed + (host_port,)})


@task(name="controls", cache_policy=NONE)
def controls_task(params: Params, layout: T.Layout, round0: dict) -> Any:
    """Train and evaluate the filter-only, human-only and oracle controls (skipped when unchanged)."""

    out = layout.comparison
    upstream = [round0[n] for n in ("pretrain", "capfilt", "ingest_web", "ingest_human", "ingest_test")
                if n in round0]

    def run(fresh: bool) -> None:
        res = run_controls(params, inputs_of(layout), layout.corpus(0), out, base=layout.base_model(0), fresh=fresh)
        write_json({"controls": results_to_json(res)}, out / "controls.json")

    return T.as_state(T.cached_stage(params, layout, "controls", None, out,
                                     ["pretrain", "retrain", "model", "evaluate", "capfilt.prompt"],
                                     upstream, [layout.ground_truth], run, done_file="controls.json", pass_fresh=True))


def comparison_results(params: Params, layout: T.Layout, rounds: int) -> list[Any]:
    """The table's columns: the rounds' (:func:`vlp_core.comparison.round_results`) plus the controls."""

    cols = round_results(params, layout, rounds)
    controls = layout.comparison / "controls.json"
    if controls.exists():
        cols += results_from_json(read_json(controls)["controls"])
    return cols


@flow(name="vlp-demo", log_prints=True)
def demo_flow(params_path: str = "params.yaml", overrides: Sequence[str] = (), workdir: str = ".",
              rounds: Optional[int] = None, port: int = 8765, controls: bool = True) -> dict:

    overrides = tuple(overrides)
    layout, params = open_workdir(workdir, params_path, overrides)
    out: dict[str, Any] = {"synthetic": T.unwrap(synthetic_task(params, layout))}
    if V.is_dvc_repo(layout.root) and params.orchestration.dvc_commit and not T.tracked_overrides(overrides):
        V.dvc_commit(layout.root, ["synthetic"])
    n = params.orchestration.rounds if rounds is None else rounds
    with serve_world(layout.world, port=port) as srv:
        write_urls_if_changed(layout, srv.base_url)
        params = allow_server(params, srv.host_port)
        for k in range(n):
            out[f"round{k}"] = run_round(params, layout, k, overridden=T.tracked_overrides(overrides))
    report = write_report_if_possible(params, layout)
    out["report"] = str(report) if report else None
    if n >= 1 and controls:
        out["controls"] = T.unwrap(controls_task(params, layout, out["round0"]))
        out["table"] = write_comparison(params, layout, n)
    return out


def write_comparison(params: Params, layout: T.Layout, rounds: int) -> str:
    """Write ``data/comparison/{table.md,table.txt,results.json}``; returns the text table."""

    cols = comparison_results(params, layout, rounds)
    out = layout.data / "comparison"
    text, markdown = comparison_table(cols), comparison_table(cols, markdown=True)
    write_json({"models": results_to_json(cols)}, out / "results.json")
    write_text(markdown, out / "table.md")
    write_text(text + "\n", out / "table.txt")
    try:  # an artifact is a nicety
        create_table_artifact(key="vlp-comparison", table=[{"": label, **dict(zip((c.name for c in cols), vals))}
                                                           for label, vals in table_rows(cols)],
                              description="CapFilt: the rounds vs raw web, filter-only, human-only and oracle")
    except Exception as exc:  # noqa: BLE001
        print(f"could not create the comparison artifact: {exc}")
    return text


def run_demo(params_path: str = "params.yaml", overrides: Sequence[str] = (), workdir: str = "demo",
             rounds: Optional[int] = None, port: int = 8765, controls: bool = True) -> dict:
    """Prepare the demo's repo in ``workdir`` (:func:`prepare_demo_repo`, its params.yaml from
    ``params_path`` + ``flows/demo.yaml``) and run :func:`demo_flow` there."""
    base = Path(params_path)
    if not base.exists() and params_path == "params.yaml":
        base = PROJECT / "params.yaml"  # run from elsewhere: the platform's own settings
    elif not base.exists():

        raise ConfigError(params_path, "<file>", "file not found")
    prepare_demo_repo(workdir, base)
    layout, params = open_workdir(workdir, "params.yaml", overrides)  # the demo repo's own params.yaml
    f = demo_flow.with_options(task_runner=task_runner_for(params))
    return f(params_path="params.yaml", overrides=tuple(overrides), workdir=str(layout.root), rounds=rounds, port=port,
             controls=controls)


__all__ = ["comparison_results", "controls_task", "demo_flow", "run_demo", "synthetic_task", "write_comparison",
           "write_urls_if_changed"]
