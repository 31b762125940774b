"""``vlp deploy``: a Prefect deployment of the nightly flow on a cron schedule.

The deployment runs ``flows/cycles.py:nightly_flow`` (incremental ingest of the growing web
URL list, then CapFilt of the new shards) from this checkout on a *process* work pool.  It
needs a Prefect API that outlives the command: start one with ``infra/start.sh`` (or
``prefect server start``) and set ``PREFECT_API_URL``; then a worker
(``prefect worker start --pool vlp-process``) picks the scheduled runs up.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence
from uuid import UUID

from vlp_core.config import Params
from vlp_core.errors import VlpError

REPO_ROOT = Path(__file__).resolve().parent.parent
NIGHTLY_ENTRYPOINT = "flows/cycles.py:nightly_flow"


def ensure_process_pool(name: str) -> None:
    """Create the process work pool ``name`` unless it exists."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def go() -> None:
        async with get_client() as client:
            try:
                await client.read_work_pool(name)
            except ObjectNotFound:
                try:
                    await client.create_work_pool(WorkPoolCreate(name=name, type="process"))
                except ObjectAlreadyExists:
                    pass

    run_coro_as_sync(go())


class DeployError(VlpError, RuntimeError):
    """A deployment that would not outlive the command (no persistent Prefect API configured)."""


def persistent_api_url() -> str:
    """The configured ``PREFECT_API_URL``; :class:`DeployError` (one line) without one: Prefect
    would then deploy to a temporary server that stops when ``vlp deploy`` exits."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise DeployError("vlp deploy needs a Prefect server that outlives it: start one (infra/start.sh, "
                          "or prefect server start) and set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api)")
    return str(url)


def deploy_nightly(params: Params, params_path: str = "params.yaml", workdir: str = ".", name: str = "nightly",
                   cron: Optional[str] = None, pool: Optional[str] = None,
                   entrypoint: str = NIGHTLY_ENTRYPOINT, parameters: Optional[dict[str, Any]] = None,
                   overrides: Sequence[str] = ()) -> UUID:
    """Create (or update) deployment ``<flow>/<name>`` with a cron schedule on a process pool.
    ``workdir`` and ``params_path`` are stored resolved, so the worker finds the data;
    ``overrides`` (``-S`` settings) are stored with them, so every scheduled run uses them.
    Refuses (:class:`DeployError`) without a persistent API (:func:`persistent_api_url`)."""
    from prefect import Flow

    persistent_api_url()
    pool = pool or params.orchestration.work_pool
    cron = cron if cron is not None else params.orchestration.schedule_cron
    ensure_process_pool(pool)
    flow = Flow.from_source(source=str(REPO_ROOT), entrypoint=entrypoint)
    wd = Path(workdir).resolve()
    pp = Path(params_path)
    params_arg = str(pp if pp.is_absolute() else (wd / pp))
    return flow.deploy(
        name=name, work_pool_name=pool, cron=cron or None, build=False, push=False, print_next_steps=False,
        ignore_warnings=True,
        parameters=parameters if parameters is not None else {"params_path": params_arg, "workdir": str(wd),
                                                              "overrides": list(overrides)},
        description="vlp: incremental ingest of the web URL list, then CapFilt of the new shards",
        tags=["vlp"],
    )


__all__ = ["NIGHTLY_ENTRYPOINT", "DeployError", "deploy_nightly", "ensure_process_pool", "persistent_api_url"]
