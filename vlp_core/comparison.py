"""The CapFilt comparison: which corpus each model trains on, and the results table.

The models, each trained for the same number of steps (from scratch, or -- with
``retrain.init: continue`` -- the pretrained model trained on):

=============  ==========================================================================
pretrained     round 0's base model: the raw web pairs (every downloaded alt-text) + human
round 0, 1     round k's retrained model: version ``round<k>``'s CapFilt corpus (kept web +
               kept synthetic) plus human (round k as :mod:`vlp_core.layout` defines it)
raw web        the pretrained model trained on, on the raw web again (continue mode only)
filter-only    round 0's corpus without synthetic captions: what the filter alone gives
human-only     the human pairs alone
oracle         the web pairs the ground truth says are clean, plus human
filter-only    (:func:`run_comparison` with more than one round) the last round's corpus
(round k)      without synthetic captions: that round's filter alone, against round k
=============  ==========================================================================

The oracle is the only corpus built from ground truth; it exists to measure the gap that
CapFilt closes.  :func:`comparison_table` renders one column per model and the rows the
demo prints: corpus size by source, noise among kept web texts, synthetic-caption
correctness, filter detection quality, retrieval and captioning metrics, and when each run
learned (its final ITC/ITM losses and the step its ITM loss settled, :mod:`vlp_core.train.curves`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vlp_core.audit import audit_corpus, oracle_rows
from vlp_core.io import read_json, write_parquet
from vlp_core.layout import CORPUS_DIR, LOSS_FILE, MANIFEST_FILE, PRETRAIN
from vlp_core.rounds import compose, run_steps
from vlp_core.schema import C, CORPUS_SCHEMA, SUCCESS, conform
from vlp_core.train.curves import ITM_SETTLED_LEVEL, loss_summary
from vlp_core.train.data import load_pairs
from vlp_core.train.evaluate import evaluation_settings, run_evaluate
from vlp_core.train.loop import in_fresh_process, retrain_settings, run_pretrain, run_retrain

@dataclass
class ModelResult:
    """One column of the table."""

    name: str
    sources: list[tuple[str, str]] = field(default_factory=list)  # training sources (path, source)
    audit: dict[str, Any] = field(default_factory=dict)  # vlp_core.audit.audit_corpus of its corpus
    metrics: dict[str, Any] = field(default_factory=dict)  # vlp_core.train.evaluate metrics.json
    sizes: dict[str, int] = field(default_factory=dict)  # training pairs by source
    training: dict[str, Any] = field(default_factory=dict)  # vlp_core.train.curves.loss_summary of its loss.csv


# --------------------------------------------------------------------------- corpora
def _read_dir(corpus_dir: str | Path) -> pa.Table:
    files = sorted(Path(corpus_dir).glob("*.parquet"))
    if not files:
        return CORPUS_SCHEMA.empty_table()
    return pa.concat_tables([conform(pq.read_table(f), CORPUS_SCHEMA) for f in files])


def filter_only_corpus(corpus_dir: str | Path, out_dir: str | Path) -> Path:
    """Round k's corpus without its synthetic captions (the filter-only control)."""
    t = _read_dir(corpus_dir)
    t = t.filter(pc.not_equal(t[C.SOURCE], "synthetic"))
    out = Path(out_dir)
    write_parquet(t, out / "corpus.parquet")
    return out


def oracle_corpus(web_manifest: str | Path, world_dir: Optional[str | Path], out_dir: str | Path) -> Path:
    """Every downloaded web pair, kept exactly when the ground truth says its text is clean.
    With ``world_dir=None`` every pair is kept: the raw web corpus of round 0."""

    web_manifest = Path(web_manifest)
    if web_manifest.is_dir():
        web_manifest = web_manifest / MANIFEST_FILE
    m = pq.read_table(web_manifest)
    clean = set(oracle_rows(web_manifest, world_dir)) if world_dir is not None else set(m[C.ROW].to_pylist())
    m = m.filter(pc.equal(m[C.STATUS], SUCCESS))
    rows = m[C.ROW].to_pylist()
    kept = pa.array([r in clean for r in rows], pa.bool_())
    n = m.num_rows
    t = pa.table(
        {
            C.KEY: m[C.KEY],
            C.URL: m[C.URL],
            C.SHARD: m[C.SHARD],
            C.CANDIDATE: pa.array([0] * n, pa.int16()),
            C.TEXT: m[C.CAPTION],
            C.SOURCE: pa.array(["web"] * n),
            C.KEPT: kept,
            C.REASON: pa.array([None if k else "oracle_noise" for k in kept.to_pylist()], pa.string()),
            C.ROUND: pa.array([0] * n, pa.int32()),
        }
    )
    out = Path(out_dir)
    write_parquet(conform(t, CORPUS_SCHEMA), out / "corpus.parquet")
    return out


def raw_corpus(web_manifest: str | Path, out_dir: str | Path) -> Path:
    """The raw web corpus (every downloaded alt-text kept), as round 0 trains on it."""
    return oracle_corpus(web_manifest, None, out_dir)


def pair_counts(sources: list[tuple[str, str]], root: str | Path = ".") -> dict[str, int]:
    """Training pairs by source, as the trainer will read them (from the work dir ``root``)."""
    counts = pc.value_counts(load_pairs(sources, root)[C.SOURCE]).to_pylist()
    return {c["values"]: int(c["counts"]) for c in counts}


# --------------------------------------------------------------------------- the experiment
@dataclass
class Inputs:
    """What the comparison reads: ingest manifests (or world URL lists) and the world; ``root``:
    the work dir their shard references are relative to (:mod:`vlp_core.layout`)."""

    web: str
    human: str
    test: str
    world: str
    root: str = "."

    @property
    def ground_truth(self) -> Path:
        return Path(self.world) / "ground_truth.parquet"


def same_evaluation(metrics: dict[str, Any], params) -> bool:
    """Whether stored ``metrics`` were computed with the settings ``params`` gives now
    (:func:`vlp_core.train.evaluate.evaluation_settings`: ``k_test``, caption decoding, prompt,
    caption lengths, the swap-negative seed).  A metrics file from before the settings were
    recorded is judged on what it does record: ``k_test`` and ``caption_decode`` (greedy, the
    only default, when absent)."""

    want = evaluation_settings(params)
    if "settings" in metrics:
        return metrics["settings"] == want
    return (metrics.get("k_test") == want["k_test"]
            and metrics.get("caption_decode", "greedy") == want["caption_decode"])


def lacks_scene_recall(metrics: dict[str, Any]) -> bool:
    """Stored metrics of a test split with a scene for every image, written before retrieval
    was also judged by the scene (:func:`vlp_core.train.metrics.scene_recall`): they are
    recomputed, so every column of a table has the scene-judged R@1 and the exact ceiling."""
    return (metrics.get("n_ground_truth") is not None and metrics.get("n_ground_truth") == metrics.get("n_images")
            and "r1_mean_scene" not in metrics)


def evaluated(params, name: str, model_dir: str | Path, eval_dir: str | Path, inputs: Inputs,
              sources: list[tuple[str, str]], corpus: Optional[str | Path]) -> ModelResult:
    """One column for a model that is already trained: evaluate it on the test split (reusing
    ``eval_dir/metrics.json`` when it was written with the same evaluation settings) and audit
    the corpus it trained on."""

    metrics_file = Path(eval_dir) / "metrics.json"
    metrics = read_json(metrics_file) if metrics_file.exists() else None
    if metrics is None or not same_evaluation(metrics, params) or lacks_scene_recall(metrics):
        metrics = run_evaluate(params, model_dir, (inputs.test, "human"), eval_dir, ground_truth=inputs.ground_truth,
                               root=inputs.root)
    audit = audit_corpus(corpus, inputs.world) if corpus is not None else {}
    return ModelResult(name, sources, audit, metrics, pair_counts(sources, inputs.root),
                       loss_summary(Path(model_dir).parent / LOSS_FILE))


def train_and_evaluate(params, name: str, sources: list[tuple[str, str]], inputs: Inputs, out_dir: str | Path,
                       corpus: Optional[str | Path] = None, log=print,
                       base: Optional[str | Path] = None, fresh: bool = False) -> ModelResult:
    """Train a model on ``sources`` (resumes from its checkpoint, skips when finished),
    evaluate it and audit its corpus.  Without ``base`` it is pretrained from scratch (round
    0); with one it is *retrained* as ``params.retrain`` says: from scratch for
    ``pretrain.steps`` (BLIP), or ``base`` trained on for ``retrain.steps``."""

    d = Path(out_dir)
    what = ", ".join(s for _, s in sources)
    if base is None or params.retrain.init == "scratch":
        log(f"[{name}] training from scratch on {what} for {params.pretrain.steps} steps")
    else:
        log(f"[{name}] training {base} on {what} for {retrain_settings(params).steps} more steps")
    if base is None:
        in_fresh_process(run_pretrain, params, sources, d / "train", fresh=fresh, root=inputs.root)
    else:
        in_fresh_process(run_retrain, params, sources, base, d / "train", fresh=fresh, root=inputs.root)
    return evaluated(params, name, d / "train" / "model", d / "eval", inputs, sources, corpus)


def run_controls(params, inputs: Inputs, round0_corpus: str | Path, workdir: str | Path,
                 log=print, base: Optional[str | Path] = None, fresh: bool = False) -> list[ModelResult]:
    """The controls, each trained like round 0's retrain (``base``: round 0's base model, the
    pretrained one; see :func:`train_and_evaluate`):

    * **raw web** (only when ``retrain.init`` is continue): the pretrained model trained on, for
      the same steps, on the raw web pairs plus human -- the fair baseline of round 0, which got
      those steps too;
    * **filter-only**: round 0's corpus without its synthetic captions (what the filter alone gives);
    * **human-only**: the human pairs alone;
    * **oracle**: the web pairs the ground truth calls clean, plus the human pairs.

    ``fresh`` retrains every control from the start (their settings or inputs changed)."""
    work = Path(workdir)
    human = (inputs.human, "human")
    fo = filter_only_corpus(round0_corpus, work / "filteronly" / CORPUS_DIR)
    out = []
    if base is not None and params.retrain.init == "continue":
        raw = raw_corpus(inputs.web, work / "rawweb" / CORPUS_DIR)
        out.append(train_and_evaluate(params, "raw web", [(inputs.web, "web"), human], inputs, work / "rawweb", raw,
                                      log, base, fresh))
    return out + [
        train_and_evaluate(params, "filter-only", [(str(fo), "web"), human], inputs, work / "filteronly", fo, log,
                           base, fresh),
        human_only_control(params, inputs, work, log, base, fresh),
        oracle_control(params, inputs, work, log, base, fresh),
    ]


def human_only_control(params, inputs: Inputs, workdir: str | Path, log=print,
                       base: Optional[str | Path] = None, fresh: bool = False) -> ModelResult:
    """The human-only control of :func:`run_controls` (needs no CapFilt round)."""
    return train_and_evaluate(params, "human-only", [(inputs.human, "human")], inputs, Path(workdir) / "humanonly",
                              None, log, base, fresh)


def oracle_control(params, inputs: Inputs, workdir: str | Path, log=print,
                   base: Optional[str | Path] = None, fresh: bool = False) -> ModelResult:
    """The oracle control of :func:`run_controls` (needs no CapFilt round): the web pairs the
    ground truth calls clean, plus the human pairs."""
    work = Path(workdir)
    oc = oracle_corpus(inputs.web, inputs.world, work / "oracle" / CORPUS_DIR)
    return train_and_evaluate(params, "oracle", [(str(oc), "web"), (inputs.human, "human")], inputs, work / "oracle",
                              oc, log, base, fresh)


# the controls that need no CapFilt round: with ``retrain.init: scratch`` they need no pretrained
# model either, so they can be trained before (or apart from) the rounds (bench/cycle.py --only)
STANDALONE_CONTROLS = {"human-only": human_only_control, "oracle": oracle_control}


def inputs_of(layout) -> Inputs:
    """The comparison's inputs in a work dir (:class:`vlp_core.layout.Layout`)."""
    return Inputs(web=str(layout.ingest("web")), human=str(layout.ingest("human")), test=str(layout.ingest("test")),
                  world=str(layout.world), root=str(layout.root))


def round_results(params, layout, rounds: int) -> list[ModelResult]:
    """The rounds' columns from a work dir's outputs: "pretrained" (round 0's base model, trained
    on the raw web pairs plus human) and "round k" (round k's retrained model, trained on version
    ``round<k>``'s CapFilt corpus plus human), each evaluated on the test split (reusing the
    stored ``metrics.json`` when its evaluation settings are today's)."""

    inputs = inputs_of(layout)
    human = (inputs.human, "human")
    raw = raw_corpus(inputs.web, layout.comparison / "raw_corpus")
    cols = [evaluated(params, "pretrained", layout.model(0, PRETRAIN), layout.stage(0, "evaluate_base"), inputs,
                      [(inputs.web, "web"), human], raw)]
    for k in range(rounds):
        capfilt = layout.stage(k, "capfilt")
        cols.append(evaluated(params, f"round {k}", layout.model(k, "retrain"), layout.stage(k, "evaluate"), inputs,
                              [(str(capfilt), "web"), human], layout.corpus(k)))
    return cols


def run_comparison(params, layout, rounds: int = 2, controls: bool = True, log=print) -> list[ModelResult]:
    """The rounds 0..``rounds``-1 of :func:`vlp_core.rounds.compose` (the same steps as the flows,
    run directly, without Prefect or DVC, on the downloads already in ``layout``'s
    ``data/ingest``), then the controls.  Every step is skipped by the stage cache when its
    inputs did not change, so a rerun resumes.  Returns the table's columns."""

    results: dict[str, dict] = {}
    for k in range(rounds):
        steps = [s for s in compose(params, layout, k, ingest=False, record=False) if s.id not in results]
        results = run_steps(params, layout, steps, results, log)
    cols = round_results(params, layout, rounds)
    if controls:
        inputs = inputs_of(layout)
        cols += run_controls(params, inputs, layout.corpus(0), layout.comparison, log, base=layout.base_model(0))
        if rounds > 1:
            cols.append(last_filter_only(params, inputs, layout, rounds - 1, log))
    return cols


def filter_only_name(round: int) -> str:
    """The filter-only control's column for round ``round``'s corpus: "filter-only" for round 0's
    (:func:`run_controls`), "filter-only (round k)" for a later round's."""
    return "filter-only" if round == 0 else f"filter-only (round {round})"


def last_filter_only(params, inputs: Inputs, layout, round: int, log=print) -> ModelResult:
    """Filter-only for round ``round`` > 0 (BLIP's bootstrap: that round's captioner and filter
    were fine-tuned from round k-1's retrained model): round ``round``'s corpus without its
    synthetic captions, trained like that round's retrain, so the round's synthetic captions are
    measured against the same round's filter alone."""
    work = layout.comparison / f"filteronly_round{round}"
    fo = filter_only_corpus(layout.corpus(round), work / CORPUS_DIR)
    return train_and_evaluate(params, filter_only_name(round), [(str(fo), "web"), (inputs.human, "human")], inputs,
                              work, fo, log, layout.base_model(round))


def results_to_json(results: list[ModelResult]) -> list[dict[str, Any]]:
    return [{"name": r.name, "sources": [list(s) for s in r.sources], "audit": r.audit, "metrics": r.metrics,
             "sizes": r.sizes, "training": r.training} for r in results]


def results_from_json(data: list[dict[str, Any]]) -> list[ModelResult]:
    return [ModelResult(d["name"], [tuple(s) for s in d.get("sources", [])], d.get("audit", {}),
                        d.get("metrics", {}), d.get("sizes", {}), d.get("training", {})) for d in data]


# --------------------------------------------------------------------------- table
def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _num(x: Optional[float], fmt: str = "{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def _get(d: dict, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def table_rows(results: list[ModelResult]) -> list[tuple[str, list[str]]]:
    rows: list[tuple[str, list[str]]] = []

    def add(label: str, fn) -> None:
        rows.append((label, [fn(r) for r in results]))

    for src in ("web", "synthetic", "human"):
        add(f"pairs: {src}", lambda r, s=src: str(r.sizes.get(s, 0)) if r.sizes else "-")
    add("noise in kept web texts %", lambda r: _pct(_get(r.audit, "web_noise_rate_kept")))
    add("synthetic correct % (all)", lambda r: _pct(_get(r.audit, "synthetic_correct")))
    for a in ("colour", "shape", "size", "relation"):  # relation: the position in a one-object world
        add(f"synthetic correct % {'relation/pos' if a == 'relation' else a}", lambda r, a=a: _pct(_get(r.audit, "synthetic_correct_by_attribute", a)))
    add("synthetic kept correct %", lambda r: _pct(_get(r.audit, "synthetic_correct_kept")))
    for what, key in (("web noise", "web_detection"), ("wrong synth", "synthetic_detection")):
        add(f"filter {what} precision %", lambda r, k=key: _pct(_get(r.audit, k, "precision")))
        add(f"filter {what} recall %", lambda r, k=key: _pct(_get(r.audit, k, "recall")))
        add(f"filter {what} ROC-AUC", lambda r, k=key: _num(_get(r.audit, k, "roc_auc"), "{:.3f}"))
    for m, label in (("tr_r1", "TR@1"), ("tr_r5", "TR@5"), ("ir_r1", "IR@1"), ("ir_r5", "IR@5"), ("r1_mean", "R@1 mean"),
                     ("r1_ceiling", "R@1 mean: ceiling (same scenes)"), ("r1_mean_scene", "R@1 mean, judged by scene")):
        add(label, lambda r, m=m: _num(_get(r.metrics, m)))
    add("BLEU-4", lambda r: _num(_get(r.metrics, "bleu4"), "{:.3f}"))
    add("CIDEr", lambda r: _num(_get(r.metrics, "cider"), "{:.3f}"))
    add("caption accuracy %", lambda r: _pct(_get(r.metrics, "caption_acc")))
    # when the run learned (vlp_core.train.curves): "never" = its ITM loss ended above the level
    add("final ITC loss", lambda r: _num(_get(r.training, "final_itc"), "{:.2f}"))
    add("final ITM loss", lambda r: _num(_get(r.training, "final_itm"), "{:.3f}"))
    add(f"ITM loss < {ITM_SETTLED_LEVEL} from step",
        lambda r: "-" if not r.training or "final_itm" not in r.training
        else ("never" if r.training.get("itm_settled_step") is None else str(r.training["itm_settled_step"])))
    return rows


def comparison_table(results: list[ModelResult], markdown: bool = False) -> str:
    """Render one column per model."""
    names = [r.name for r in results]
    rows = table_rows(results)
    if markdown:
        head = "| | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names) + "\n"
        return head + "".join(f"| {label} | " + " | ".join(vals) + " |\n" for label, vals in rows)
    w0 = max(len(label) for label, _ in rows)
    ws = [max(len(n), *(len(v[i]) for _, v in rows)) for i, n in enumerate(names)]
    line = lambda label, vals: label.ljust(w0) + "  " + "  ".join(v.rjust(w) for v, w in zip(vals, ws))  # noqa: E731
    out = [line("", names), "-" * (w0 + 2 + sum(ws) + 2 * (len(ws) - 1))]
    out += [line(label, vals) for label, vals in rows]
    return "\n".join(out)
