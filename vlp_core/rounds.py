"""One round composed once: which stage functions run, on which inputs, in which order.

:func:`round_steps` lists a round's steps (:class:`Step`): the stage, its output folder
(:class:`vlp_core.layout.Layout`), the settings it reads, the steps whose outputs it reads,
and the call into the stage function.  The Prefect flows wrap each step in a task
(:mod:`flows.tasks`), the demo runs the flows, and the comparison and ``bench/cycle.py`` run
the same steps directly (:func:`run_steps`); all of them skip a step through one stage cache
(:mod:`vlp_core.stagecache`).  Round k has one meaning (see :mod:`vlp_core.layout`):

    ingest web/human/test -> pretrain (round 0 only; or an imported checkpoint)
    -> finetune captioner + filter (from round k's base model) -> capfilt -> features
    -> retrain -> evaluate (+ evaluate_base: round 0's pretrained model) -> gate -> record
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from vlp_core import catalog, promotion
from vlp_core.capfilt import stage as capfilt_stage
from vlp_core.config import Params
from vlp_core.features import stage as features_stage
from vlp_core.ingest import stage as ingest_stage
from vlp_core.io import read_json, write_json
from vlp_core.layout import (GATE_FILE, METRICS_FILE, PRETRAIN, RECORD_FILE, RECORDED_STATS, SPLITS, STATS_FILE,
                             Layout, dvc_stage_name, resolve, stage_id)
from vlp_core.models import families, fresh_family
from vlp_core.stagecache import StageInputError, StageResult, cached_stage, input_key
from vlp_core.train import evaluate as train_evaluate
from vlp_core.train import loop as train_loop

# The order of a round's steps; ``until`` stops after the named one.
STEPS = ("ingest", "pretrain", "finetune", "capfilt", "features", "retrain", "evaluate", "record")


@dataclass(frozen=True)
class Step:
    """One stage of a round.  ``call`` runs the stage function (``call(fresh=...)`` when
    ``trains``); a step without ``call`` is *given*: its output exists already (an imported
    checkpoint, an earlier round's model) and its key is the digest of ``files``."""

    name: str  # the stage: ingest_web, pretrain, finetune_captioner, capfilt, evaluate_base, ...
    round: Optional[int]
    out_dir: Path
    sections: tuple[str, ...]  # the params sections it reads
    needs: tuple[str, ...]  # ids of the steps whose outputs it reads
    call: Optional[Callable[..., Any]] = None
    files: tuple[Path, ...] = ()  # external inputs, by content
    done_file: str = STATS_FILE
    trains: bool = False  # a training stage: told whether to start over (``fresh``)
    always: bool = False  # run every time, past the stage cache; ``call()`` returns the result (the gate)
    in_dvc: bool = True  # a dvc.yaml stage (the gate is not: its verdict is not a DVC output)
    network: bool = False  # downloads: retried on transient errors by the flows
    task: str = ""  # the Prefect task's name (ingest, finetune, capfilt, ...)
    run_name: str = ""  # the Prefect task run's name (ingest-web, finetune-filter-round0, ...)
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def id(self) -> str:
        return stage_id(self.name, self.round)

    @property
    def dvc_name(self) -> str:
        return dvc_stage_name(self.name, self.round)

    @property
    def given(self) -> bool:
        return self.call is None


def _step_of(until: Optional[str]) -> Optional[str]:
    if until is None:
        return None
    u = "finetune" if until.startswith("finetune") else ("ingest" if until.startswith("ingest") else until)
    if u not in STEPS:
        raise StageInputError(f"until={until!r}: not a step (one of {', '.join(STEPS)})")
    return u


def after(step: str, until: Optional[str]) -> bool:
    """True when ``step`` comes after ``until`` (so it must not run)."""
    u = _step_of(until)
    return u is not None and STEPS.index(step) > STEPS.index(u)


# --------------------------------------------------------------------------- the steps
def ingest_step(params: Params, layout: Layout, split: str) -> Step:
    def call() -> None:
        ingest_stage.run_ingest(params, layout.urls(split), layout.ingest(split), root=layout.root)

    return Step(f"ingest_{split}", None, layout.ingest(split), ("ingest",), (), call, files=(layout.urls(split),),
                network=True, task="ingest", run_name=f"ingest-{split}",
                meta={"missing": "URL list not found (write one, or run `vlp demo`)"})


def given_ingest(layout: Layout, split: str) -> Step:
    """An ingest that exists already (the comparison's and the benchmarks' shared downloads): its
    manifest, by content, stands for it."""
    return Step(f"ingest_{split}", None, layout.ingest(split), (), (), None, files=(layout.manifest(split),),
                task="ingest", run_name=f"ingest-{split}")


def _human(layout: Layout) -> list[tuple[str, str]]:
    return [(str(layout.ingest("human")), "human")]


def pretrain_step(params: Params, layout: Layout, init_from: Optional[str] = None) -> Step:
    """Round 0's base model: pretrained on the web and human pairs, or an imported checkpoint."""
    if init_from:
        return Step(PRETRAIN, 0, Path(init_from).parent, (), (), None, files=(Path(init_from),),
                    task="import-checkpoint", run_name="import-checkpoint")
    out = layout.stage(0, PRETRAIN)

    def call(fresh: bool) -> None:
        train_loop.run_pretrain(params, [(str(layout.ingest("web")), "web")] + _human(layout), out, fresh=fresh,
                                root=layout.root)

    return Step(PRETRAIN, 0, out, ("pretrain", "model"), ("ingest_web", "ingest_human"), call, trains=True,
                task="pretrain", run_name="pretrain-round0")


def base_step(layout: Layout, round: int, model: Optional[str | Path] = None) -> Step:
    """Round k > 0's base model (given: it exists): ``model``, or round k-1's retrained model (the
    flows pass the latest promoted round's, :func:`vlp_core.promotion.source_model`)."""
    prev = Path(model) if model else layout.base_model(round)
    return Step(PRETRAIN, round, prev.parent, (), (), None, files=(prev,), task="base", run_name=f"base-round{round}")


def _base_model(layout: Layout, base: Step) -> Path:
    """The folder of a round's base model: the given one, or round 0's pretrained model."""
    return Path(base.files[0]) if base.given else layout.model(0, PRETRAIN)


@dataclass(frozen=True)
class CaptionerSource:
    """Where a round's captioner is fine-tuned from (``capfilt.captioner``): ``model`` (None: the
    round has no captioner, its CapFilt judges the web texts only), whether that is the round's base
    model, and why, in words."""

    model: Optional[Path]
    from_base: bool
    why: str


def captioner_source(params: Params, layout: Layout, base: Step) -> CaptionerSource:
    """``capfilt.captioner`` resolved for a round whose base model is ``base``: ``base`` (BLIP's
    CapFilt: the captioner is fine-tuned from the base model, unless the base model's family does
    not generate -- ViLBERT -- and the round then has none), ``none``, or a model folder of a family
    that generates (checked here: a missing folder or a non-generating family is one line)."""
    choice = params.capfilt.captioner
    base_model = _base_model(layout, base)
    if choice == "none":
        return CaptionerSource(None, False, "capfilt.captioner=none: the filter judges the web texts only")
    if choice == "base":
        if not base.given:
            fam = fresh_family(params.model.arch, params.model.family)
        elif (base_model / families.CONFIG_FILE).is_file():
            fam = families.saved_family(base_model)
        else:  # not a model (yet): the step that loads it says so, with its path
            fam = families.DEFAULT_FAMILY
        if families.generates(fam):
            return CaptionerSource(base_model, True, "fine-tuned from the round's base model")
        return CaptionerSource(None, False, f"the base model is a {fam!r} model, which does not generate captions: "
                                            "the filter judges the web texts only (set capfilt.captioner to a "
                                            "BLIP model folder for synthetic captions)")
    path = resolve(choice, layout.root)
    if not path.is_dir():
        raise StageInputError(f"capfilt.captioner: {path}: no such model folder (base, none, or a model folder)")
    fam = families.saved_family(path)
    if not families.generates(fam):
        raise StageInputError(f"capfilt.captioner: {path} is a {fam!r} model, which does not generate captions "
                              "(give a blip or xvlm model folder, or none)")
    return CaptionerSource(path, False, f"fine-tuned from {choice}")


def round_steps(params: Params, layout: Layout, round: int, base: Step, until: Optional[str] = None,
                record: bool = True) -> list[Step]:
    """Round ``round``'s steps after its base model ``base`` (see the module doc), up to ``until``.
    The captioner comes from :func:`captioner_source`; a round without one has no
    ``finetune_captioner`` step and its CapFilt judges the web texts only."""
    k = round
    base_model = _base_model(layout, base)
    human = _human(layout)
    steps: list[Step] = []
    source = captioner_source(params, layout, base)
    targets = ("filter",) if source.model is None else ("captioner", "filter")

    if not after("finetune", until):
        for target in targets:
            out = layout.stage(k, f"finetune_{target}")
            init = base_model if target == "filter" or source.from_base else source.model
            given_init = target == "captioner" and not source.from_base

            def call(fresh: bool, target: str = target, out: Path = out, init: Path = init) -> None:
                train_loop.run_finetune(params, target, human, str(init), out, fresh=fresh, root=layout.root)

            # a captioner fine-tuned from another folder is not dvc.yaml's stage (its dependency is
            # the base model): left out of dvc.lock rather than recorded with the wrong dependency
            steps.append(Step(f"finetune_{target}", k, out, (f"finetune.{target}",),
                              ("ingest_human",) if given_init else (base.id, "ingest_human"), call,
                              files=(init,) if given_init else (), trains=True, in_dvc=not given_init,
                              task="finetune", run_name=f"finetune-{target}-round{k}"))
    captioner = None if source.model is None else layout.model(k, "finetune_captioner")
    filter_ = layout.model(k, "finetune_filter")
    if not after("capfilt", until):
        out = layout.stage(k, "capfilt")

        def capfilt(out: Path = out) -> None:
            capfilt_stage.run_capfilt(params, layout.manifest("web"), None if captioner is None else str(captioner),
                                      str(filter_), out, round=k, calibration=layout.manifest("human"),
                                      root=layout.root)

        needs = tuple(stage_id(f"finetune_{t}", k) for t in targets) + ("ingest_web", "ingest_human")
        # without a captioner, dvc.yaml's capfilt stage (which reads finetune_captioner/model) is
        # not what ran: it stays out of dvc.lock
        steps.append(Step("capfilt", k, out, ("capfilt",), needs, capfilt, in_dvc=captioner is not None,
                          task="capfilt", run_name=f"capfilt-round{k}",
                          meta={"captioner": None if captioner is None else str(captioner), "why": source.why}))
    if not after("features", until):
        out = layout.stage(k, "features")

        def features(out: Path = out) -> None:
            features_stage.run_features(params, layout.stage(k, "capfilt"), filter_, out, root=layout.root)

        steps.append(Step("features", k, out, ("features",), (stage_id("capfilt", k), stage_id("finetune_filter", k)),
                          features, task="features", run_name=f"features-round{k}"))
    if not after("retrain", until):
        out = layout.stage(k, "retrain")
        sources = [(str(layout.stage(k, "capfilt")), "web")] + human

        def retrain(fresh: bool, out: Path = out, sources: list = sources) -> None:
            train_loop.in_fresh_process(train_loop.run_retrain, params, sources, str(base_model), out, fresh=fresh,
                                        root=layout.root)

        steps.append(Step("retrain", k, out, ("pretrain", "retrain", "model"), (stage_id("capfilt", k), "ingest_human"),
                          retrain, trains=True, task="retrain", run_name=f"retrain-round{k}"))
    if not after("evaluate", until):
        steps.append(evaluate_step(params, layout, k, "retrain"))
        if k == 0 and not base.given:  # the baseline the bootstrap must beat
            steps.append(evaluate_step(params, layout, 0, PRETRAIN))
    if record and not after("record", until):
        steps.append(gate_step(params, layout, k, [s.id for s in steps if s.name.startswith("evaluate")]))
        order = ("evaluate", "features", "gate", "evaluate_base")
        steps.append(record_step(params, layout, k, [s.id for n in order for s in steps if s.name == n]))
    return steps


def gate_step(params: Params, layout: Layout, round: int, needs: Sequence[str]) -> Step:
    """Judge the round against its parent (:func:`vlp_core.promotion.judge_round`) before any
    side effect: it runs every time (a parent's verdict may have changed), and its key is the
    verdict's digest, so ``record`` is redone exactly when the verdict changes."""
    return Step("gate", round, layout.round_dir(round), ("gate",), tuple(needs),
                lambda: promotion.judge_round(params, layout, round), done_file=GATE_FILE, always=True, in_dvc=False,
                task="gate", run_name=f"gate-round{round}")


def evaluate_step(params: Params, layout: Layout, round: int, which: str) -> Step:
    """Evaluate round ``round``'s retrained model (``which="retrain"``, stage ``evaluate``) or
    round 0's pretrained model (``which="pretrain"``, stage ``evaluate_base``) on the test pairs."""
    name = "evaluate" if which == "retrain" else "evaluate_base"
    out = layout.stage(round, name)
    gt = layout.ground_truth if layout.ground_truth.exists() else None

    def call() -> None:
        train_evaluate.run_evaluate(params, layout.model(round, which), (str(layout.ingest("test")), "human"), out,
                                    ground_truth=gt, root=layout.root)

    return Step(name, round, out, ("evaluate", "capfilt.prompt", "pretrain.seed"),
                (stage_id(which, round), "ingest_test"), call, files=(gt,) if gt else (), done_file=METRICS_FILE,
                task="evaluate", run_name=f"evaluate-{which}-round{round}")


def record_step(params: Params, layout: Layout, round: int, needs: Sequence[str]) -> Step:
    """Record the round as version ``round<k>`` (``round<k>+<experiment>`` inside ``dvc exp run``:
    :func:`vlp_core.catalog.version_name`) in the DuckDB catalog, with the gate's verdict
    (``gate.json``: state promoted / rejected, reason, parent) when the round was judged."""

    def call() -> None:
        metrics = [p for p in (layout.stage(round, n) / METRICS_FILE for n in ("evaluate_base", "evaluate"))
                   if p.exists()]
        stats = [p for p in (layout.stage(round, n) / STATS_FILE for n in RECORDED_STATS) if p.exists()]
        verdict = read_json(layout.gate_file(round)) if layout.gate_file(round).exists() else {}
        s = catalog.record_version(params, catalog.version_name(f"round{round}"), layout.stage(round, "capfilt"), stats, metrics,
                                   repo_dir=layout.root, round=round, catalog=layout.root / params.catalog.path,
                                   state=verdict.get("state"), reason=verdict.get("reason"),
                                   parent=verdict.get("parent"))
        write_json({"name": s.name, "corpus_rows": s.corpus_rows, "stats": s.stats, "metrics": s.metrics},
                   layout.record_marker(round))

    return Step("record", round, layout.round_dir(round), ("catalog",), tuple(needs), call, done_file=RECORD_FILE,
                task="record", run_name=f"record-round{round}")


def compose(params: Params, layout: Layout, round: int, init_from: Optional[str] = None,
            until: Optional[str] = None, record: bool = True, ingest: bool = True,
            base_model: Optional[str | Path] = None) -> list[Step]:
    """Every step of round ``round``: the ingests (``ingest=False``: given, already downloaded),
    its base model (round 0: pretraining or ``init_from``; else ``base_model`` or round k-1's
    retrained model, which must exist), then :func:`round_steps` (with ``record``: the gate and
    the record)."""
    steps = [ingest_step(params, layout, s) if ingest else given_ingest(layout, s) for s in SPLITS]
    if after("pretrain", until):
        return steps
    if round == 0:
        base = pretrain_step(params, layout, init_from)
    else:
        base = base_step(layout, round, base_model)
        if not base.files[0].exists():
            raise StageInputError(f"{base.files[0]}: round {round} needs it (its base model) and it does not exist")
    return steps + [base] + round_steps(params, layout, round, base, until, record)


# --------------------------------------------------------------------------- running
def run_step(params: Params, layout: Layout, step: Step, upstream: Sequence[dict]) -> dict[str, Any]:
    """Run one step through the stage cache (a given step is never run: its key is its files')."""
    for f in step.files:
        if not Path(f).exists():
            raise StageInputError(f"{f}: {step.meta.get('missing') or f'{step.id} needs it and it does not exist'}")
    if step.always:
        return step.call()
    if step.given:
        key = input_key(step.id, params, step.sections, upstream, step.files)
        return StageResult(step.name, step.round, key, layout.written(step.out_dir), True, {}).as_dict()
    return cached_stage(params, layout, step.name, step.round, step.out_dir, step.sections, upstream, step.files,
                        step.call, done_file=step.done_file, pass_fresh=step.trains)


def run_steps(params: Params, layout: Layout, steps: Sequence[Step], results: Optional[dict[str, dict]] = None,
              log: Callable[[str], Any] = print) -> dict[str, dict]:
    """Run ``steps`` in order without Prefect (the comparison, the benchmarks); ``results``
    holds the steps already run, by id.  Returns every result by step id."""
    results = dict(results or {})
    for step in steps:
        res = run_step(params, layout, step, [results[n] for n in step.needs])
        if not step.given:
            log(f"[{step.run_name}] {'skipped (unchanged)' if res['skipped'] else 'done'}")
        results[step.id] = res
    return results


__all__ = ["STEPS", "CaptionerSource", "Step", "after", "captioner_source", "base_step", "compose", "evaluate_step", "gate_step", "given_ingest", "ingest_step",
           "pretrain_step", "record_step", "round_steps", "run_step", "run_steps"]
