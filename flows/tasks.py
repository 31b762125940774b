"""Prefect tasks: each runs one step of :mod:`vlp_core.rounds` through the stage cache.

The round is composed once, in :mod:`vlp_core.rounds` (which stage functions run, on which
inputs); the paths are :mod:`vlp_core.layout`'s; what is skipped is decided once, by
:mod:`vlp_core.stagecache` (Prefect's own result cache is off: ``cache_policy=NONE``).  This
module only adds what Prefect brings: a task per step, named by what it does
(``ingest-web``, ``finetune-filter-round0``, ``capfilt-round0-00000``), retries of transient
failures, and a skipped step shown in Prefect as **Cached**.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Any, Iterator, Optional, Sequence

from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from prefect.client.schemas.objects import State
from prefect.states import Completed

from vlp_core.errors import VlpError
from vlp_core.layout import SPLITS, Layout, dvc_stage_name, stage_id
from vlp_core.capfilt.stage import run_capfilt_shard
from vlp_core.rounds import Step, run_step
from vlp_core.stagecache import (StageInputError, StageResult, cached_stage, digest_path, input_key, params_subset,
                                 tracked_overrides)

FlowStageError = StageInputError  # the name the flows' callers know


def retry_unless_permanent(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's ``retry_condition_fn``: retry a failure that may pass on another try (a network
    error, a timeout, a killed process), never one that cannot (a :class:`VlpError`: bad settings,
    bad input, a folder holding other data)."""
    try:
        state.result()
    except VlpError:
        return False
    except BaseException:  # noqa: BLE001 - anything else may be transient
        return True
    return True


class _ToRunLogger(logging.Handler):
    """Hands the project's log records (training progress every ``log_every`` steps, stage
    notes) to the Prefect run's logger, so they show in the run's logs: tqdm's bar turns itself
    off without a terminal."""

    def __init__(self, run_logger: Any):
        super().__init__(logging.INFO)
        self.run_logger, self.thread = run_logger, threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        # this task's thread, or a child process it spawned (in_fresh_process relays its records);
        # not a task running beside it in another thread
        if record.thread != self.thread and record.process == os.getpid():
            return
        try:
            self.run_logger.log(record.levelno, "%s", record.getMessage())
        except Exception:  # noqa: BLE001 - a log line must never fail a stage
            self.handleError(record)


@contextlib.contextmanager
def run_logs() -> Iterator[None]:
    """While a task runs, the ``vlp_core`` loggers write to the Prefect run's logs (INFO and up)."""
    try:
        run_logger = get_run_logger()
    except Exception:  # noqa: BLE001 - outside a run (a task's .fn called directly)
        yield
        return
    root = logging.getLogger("vlp_core")
    handler, level, propagate = _ToRunLogger(run_logger), root.level, root.propagate
    root.addHandler(handler)
    root.propagate = False  # the run logger prints it (console and API): not a second time through the root
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        root.propagate = propagate


def _threads() -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("TORCH_NUM_THREADS", "2")))


def as_state(result: dict[str, Any]) -> Any:
    """A skipped step's result as Prefect's Cached state (a Completed state named "Cached"), so
    the UI and ``prefect task-run ls`` show what the stage cache skipped; a run step's result
    stays a plain value (Completed)."""
    if result.get("skipped"):
        return Completed(data=result, name="Cached", message="unchanged inputs: skipped by the stage cache")
    return result


def unwrap(value: Any) -> Any:
    """The value of a task called directly: a task that returned a state (:func:`as_state`)
    hands its caller that state, whose result is the value."""
    return value.result() if isinstance(value, State) else value


# --------------------------------------------------------------------------- tasks
@task(name="stage", cache_policy=NONE, persist_result=False)
def stage_task(params: Any, layout: Layout, step: Step, upstream: Sequence[dict]) -> Any:
    """Run ``step`` (its stage function, unless the stage cache skips it)."""
    if step.trains or step.name in ("capfilt", "features") or step.name.startswith("evaluate"):
        _threads()
    with run_logs():
        return as_state(run_step(params, layout, step, upstream))


def step_task(params: Any, step: Step):
    """``stage_task`` named and retried for ``step``: download steps retry transient errors."""
    opts: dict[str, Any] = {"name": step.task or step.name, "task_run_name": step.run_name or step.id}
    if step.network:
        o = params.orchestration
        opts.update(retries=o.retries, retry_delay_seconds=o.retry_delay_seconds,
                    retry_condition_fn=retry_unless_permanent, timeout_seconds=o.network_timeout_seconds)
    return stage_task.with_options(**opts)


@task(name="capfilt-shard", task_run_name="capfilt-round{round}-{shard.name}", cache_policy=NONE)
def capfilt_shard_task(params: Any, layout: Layout, round: int, shard: Any, captioner: Optional[str],
                       filter: str, calibration: Any) -> Any:
    """Caption and filter ONE ingest shard (the fan-out unit; skipped when the stage cache holds
    its entry); its paths are the layout's, under its absolute root, whatever the worker's cwd.
    ``captioner`` None: no captioner, the filter judges the web texts only."""
    _threads()
    with run_logs():
        return run_capfilt_shard(params, shard, captioner, filter, layout.stage(round, "capfilt"),
                                 round=round, calibration=calibration, root=layout.root)


__all__ = ["FlowStageError", "Layout", "SPLITS", "StageResult", "as_state", "cached_stage",
           "capfilt_shard_task", "digest_path", "dvc_stage_name", "input_key", "params_subset",
           "retry_unless_permanent", "run_logs", "stage_id", "stage_task", "step_task", "tracked_overrides", "unwrap"]
