"""bench/cycle.py's outcome rules (the benchmark itself is not a test; its arithmetic is)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("bench_cycle", Path(__file__).parents[1] / "bench" / "cycle.py")
cycle = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cycle)


def _seeds(rows):
    names = ("pretrained", "round 0", "filter-only", "oracle")
    return {s: dict(zip(names, r)) for s, r in enumerate(rows)}


def test_outcomes_met_and_robustness_is_reported():
    (o1, m1, d1), (o2, m2, d2), (o3, m3, d3) = cycle.outcomes(
        _seeds([(10.0, 20.0, 15.0, 20.0), (11.0, 21.0, 14.0, 21.0), (12.0, 22.0, 16.0, 22.0)]))
    assert m1 and "gain +10.00" in d1  # gain 10 +- 0 against spreads of 1
    assert m2 and "closed 100%" in d2
    assert m3 and "ahead in 3 of 3 seeds" in d3 and "not a robust" not in d3


def test_outcomes_one_lucky_seed_is_flagged():
    *_, (o3, m3, d3) = cycle.outcomes(
        _seeds([(10.0, 45.0, 22.0, 26.0), (11.0, 23.0, 33.0, 21.0), (10.0, 18.0, 20.0, 21.0)]))
    assert m3  # the rule: a positive mean
    assert "ahead in 1 of 3 seeds" in d3 and "not a robust effect" in d3


def test_outcomes_gain_inside_spread_is_not_met():
    (o1, m1, d1), (o2, m2, _), _ = cycle.outcomes(
        _seeds([(5.0, 6.0, 6.0, 20.0), (15.0, 16.0, 16.0, 20.0), (10.0, 11.0, 11.0, 20.0)]))
    assert not m1  # gain 1 against the pretrained model's sd of 5
    assert not m2  # 1 point of a 10-point gap


def _quality(aucs, filter_swaps, retrained_swaps):
    return {s: {"filter_auc": a, "filter_swap": f, "retrained_swap": r}
            for s, (a, f, r) in enumerate(zip(aucs, filter_swaps, retrained_swaps))}


def _targets(rows, quality):
    got = cycle.targets(_seeds(rows), quality)
    assert [t[:3] for t, _, _ in got] == ["(a)", "(a)", "(b)", "(c)", "(d)", "(e)"]
    return [(met, detail) for _, met, detail in got]


def test_targets_all_met_on_steady_seeds():
    rows = [(10.0, 20.0, 15.0, 20.0), (11.0, 21.0, 14.0, 21.0), (12.0, 22.0, 16.0, 22.0)]
    got = _targets(rows, _quality([0.90, 0.86, 0.95], [0.91, 0.93, 0.95], [0.80, 0.82, 0.84]))
    assert all(met for met, _ in got), got
    (_, a_every), (_, a_mean), (_, b), (_, c), (_, d), (_, e) = got
    assert "0.900, 0.860, 0.950" in a_every and "mean 0.903" in a_mean
    assert "filter 93.0%" in b and ">= target in 3 of 3" in b and "retrained model 82.0%" in b
    assert "sd 1.00" in c  # oracle 20, 21, 22
    assert "ahead in 3 of 3" in d and "+6.00 +- 1.00" in d  # round 0 - filter-only: 5, 7, 6
    assert "gain +10.00" in e and "closed 100%" in e


def test_targets_each_fails_on_its_own_numbers():
    # (a) one seed under 0.85 but the mean above it; (b) the filter under 90 % on the mean although
    # round 0's model is above it; (c) an oracle spread of 9.4 (issue 16's); (d) ahead in 2 of 3;
    # (e) a gain inside the spread
    rows = [(5.0, 7.0, 8.0, 26.1), (15.0, 16.0, 14.0, 20.8), (10.0, 12.0, 11.0, 39.0)]
    got = _targets(rows, _quality([0.84, 0.95, 0.95], [0.795, 0.85, 0.92], [0.95, 0.95, 0.95]))
    (a_every, _), (a_mean, _), (b, bd), (c, cd), (d, dd), (e, _) = got
    assert not a_every and a_mean
    assert not b and "filter 85.5%" in bd and "1 of 3" in bd
    assert not c and "sd 9.36" in cd
    assert not d and "ahead in 2 of 3" in dd
    assert not e


def test_targets_missing_numbers_and_one_seed_are_not_met():
    got = _targets([(10.0, 20.0, 15.0, 20.0)], _quality([None], [None], [0.9]))
    assert [met for met, _ in got] == [False] * 6
    assert "needs >= 2 seeds" in got[3][1] and "needs >= 2 seeds" in got[4][1]
    # a paired mean inside its own sd fails (d) even when round 0 is ahead in every seed
    rows = [(10.0, 20.0, 19.9, 20.0), (11.0, 21.0, 11.0, 21.0), (12.0, 22.0, 21.5, 22.0)]
    (d, dd) = _targets(rows, _quality([0.9] * 3, [0.9] * 3, [0.9] * 3))[4]
    assert not d and "ahead in 3 of 3" in dd


def test_a_later_round_is_judged_against_its_own_filter_only():
    # round 1 (BLIP's bootstrap) behind round 0's filter-only but ahead of its own: (d) and outcome 3
    # read "filter-only (round 1)", the gain and gap read round 1's column
    names = ("pretrained", "round 0", "round 1", "filter-only", "filter-only (round 1)", "oracle")
    rows = [(10.0, 20.0, 24.0, 25.0, 21.0, 26.0), (11.0, 21.0, 25.0, 26.0, 22.0, 27.0),
            (12.0, 22.0, 26.0, 27.0, 23.0, 28.0)]
    per_seed = {s: dict(zip(names, r)) for s, r in enumerate(rows)}
    got = cycle.targets(per_seed, _quality([0.9] * 3, [0.92] * 3, [0.95] * 3), k=1)
    texts = [t for t, _, _ in got]
    assert all("round 1" in t for t in texts if t[:3] in ("(a)", "(b)", "(d)", "(e)"))
    (d_text, d, dd), (e_text, e, ed) = got[4], got[5]
    assert d and "round 1 - filter-only +3.00 +- 0.00" in dd
    assert e and "gain +14.00" in ed and "closed 88%" in ed  # 14 of the 16-point gap
    *_, (o3, m3, d3) = cycle.outcomes(per_seed, 1)
    assert m3 and o3.startswith("round 1") and "+3.00" in d3
    assert not cycle.targets(per_seed, _quality([0.9] * 3, [0.92] * 3, [0.95] * 3))[4][1]  # round 0: -5


def test_lever_flags_set_the_sections_and_name_the_folder():
    import argparse

    from vlp_core.config import Params

    assert cycle.lever_suffix(Params()) == ""  # levers off: the folder names made before stay
    a = argparse.Namespace(ema_decay=0.999, hard_negatives=0.5, filter_hard_negatives=1.0, phrase_swaps=None)
    p = Params().replace(**cycle.lever_settings(a))
    assert (p.pretrain.ema_decay, p.finetune.captioner.ema_decay, p.finetune.filter.ema_decay) == (0.999,) * 3
    assert p.pretrain.hard_negatives == 0.5 and p.finetune.filter.hard_negatives == 1.0
    assert cycle.lever_suffix(p) == "_ema0.999_hn0.5_fhn1"
    assert cycle.lever_settings(argparse.Namespace(ema_decay=None, hard_negatives=None,
                                                   filter_hard_negatives=None, phrase_swaps=None)) == {}
    ps = Params().replace(**cycle.lever_settings(argparse.Namespace(
        ema_decay=None, hard_negatives=0.5, filter_hard_negatives=1.0, phrase_swaps=0.5)))
    assert (ps.pretrain.phrase_swaps, ps.finetune.filter.phrase_swaps) == (0.5, 0.5)
    assert cycle.lever_suffix(ps) == "_hn0.5_fhn1_ps0.5"
    sy = Params().replace(**cycle.lever_settings(argparse.Namespace(
        ema_decay=None, hard_negatives=0.5, filter_hard_negatives=None, phrase_swaps=None, synonyms=True)))
    assert "large big" in sy.pretrain.synonyms and sy.pretrain.synonyms == sy.finetune.filter.synonyms
    assert cycle.lever_suffix(sy) == "_hn0.5_syn"
    ho = Params().replace(**cycle.lever_settings(argparse.Namespace(
        ema_decay=None, hard_negatives=None, filter_hard_negatives=1.0, phrase_swaps=None, filter_holdout=0.2)))
    assert ho.finetune.filter.holdout == 0.2 and ho.pretrain.holdout == 0.0
    assert cycle.lever_suffix(ho) == "_fhn1_ho0.2"
    q = Params().replace(**{"finetune.filter.ema_decay": 0.99, "pretrain.ema_warmup": False})
    assert cycle.lever_suffix(q) == "_ema0-0-0.99"


def _summary_files(tmp_path, rows, quality, settings=("s",) * 3):
    import json

    from vlp_core.comparison import ModelResult

    names = ("pretrained", "round 0", "filter-only", "oracle")
    paths = []
    for seed, row in enumerate(rows):
        res = [ModelResult(n, metrics={"r1_mean": v, "tr_r1": v + 1, "ir_r1": v - 1, "caption_acc": 0.5})
               for n, v in zip(names, row)]
        d = tmp_path / f"machine{seed}" / f"seed{seed}"
        d.mkdir(parents=True)
        (d / cycle.SUMMARY_FILE).write_text(json.dumps(cycle.seed_summary(
            seed, "web80_human20_test10", "steps3200_r1", settings[seed], 1, res, quality[seed], 12.5)))
        paths.append(d)
    return paths


def test_seed_summaries_from_several_sittings_are_judged_together(tmp_path, capsys):
    import json

    rows = [(10.0, 20.0, 15.0, 20.0), (11.0, 21.0, 14.0, 21.0), (12.0, 22.0, 16.0, 22.0)]
    quality = _quality([0.90, 0.86, 0.95], [0.91, 0.93, 0.95], [0.80, 0.82, 0.84])
    paths = _summary_files(tmp_path, rows, quality)
    rounds, tables, got_quality = cycle.load_summaries([paths[2], paths[0] / cycle.SUMMARY_FILE, paths[1]])
    assert rounds == 1 and sorted(tables) == [0, 1, 2] and got_quality == quality
    lines, results, goals = cycle.report(tables, got_quality, 0)
    assert [m for _, m, _ in goals] == [m for m, _ in _targets(rows, quality)]  # the same judgement as a live run
    assert any(line.startswith("R@1 mean") and "oracle:  21.0 +-  1.0" in line for line in lines)
    assert any(line.startswith("TR@1") and "round 0:  22.0" in line for line in lines)
    assert any(line.startswith("R@1 ceiling") and "oracle: -" in line for line in lines)  # not in these metrics
    out_json = tmp_path / "outcomes.json"
    assert cycle.combine([str(p) for p in paths], str(out_json)) == 0
    printed = capsys.readouterr().out
    assert printed.count("[MET]") == len(results) + len(goals)
    stored = json.loads(out_json.read_text())
    assert stored["seeds"] == [0, 1, 2] and stored["r1_mean"]["1"]["filter-only"] == 14.0
    assert all(t["met"] for t in stored["targets"])


def test_seed_summaries_name_the_machines_when_they_differ(tmp_path, capsys):
    """Each summary records the arithmetic of the machine that finished it; --combine says so when
    the seeds' machines differ (the reason one seed run twice can differ), and only then."""
    import json

    from vlp_core.precision import arithmetic

    rows = [(10.0, 20.0, 15.0, 20.0)] * 3
    paths = _summary_files(tmp_path, rows, _quality([0.9] * 3, [0.9] * 3, [0.9] * 3))
    here = json.loads((paths[0] / cycle.SUMMARY_FILE).read_text())["arithmetic"]
    assert here == arithmetic("cpu") and here["threads"] >= 1 and here["torch"]
    assert cycle.machines(paths) == []
    other = paths[2] / cycle.SUMMARY_FILE
    data = json.loads(other.read_text())
    data["arithmetic"] = {**here, "cpu": "Another CPU", "cpu_flags": ["avx2", "fma"]}
    other.write_text(json.dumps(data))
    lines = cycle.machines(paths)
    assert lines[0].startswith("seeds finished on different machines")
    assert any(line.startswith("  seeds [2]: Another CPU [avx2 fma]") for line in lines)
    assert any(line.startswith("  seeds [0, 1]: ") for line in lines)
    assert cycle.combine([str(p) for p in paths]) == 0
    assert "seeds [2]: Another CPU" in capsys.readouterr().out


def test_seed_summaries_that_do_not_belong_together_are_refused(tmp_path, capsys):
    import json

    import pytest

    rows = [(10.0, 20.0, 15.0, 20.0)] * 3
    quality = _quality([0.9] * 3, [0.9] * 3, [0.9] * 3)
    paths = _summary_files(tmp_path, rows, quality, settings=("s", "s", "other"))
    with pytest.raises(cycle.SummaryError, match=r"machine2/seed2/summary.json: field 'settings' is 'other', "
                                                 r"but .*machine0/seed0/summary.json has 's'"):
        cycle.load_summaries(paths)
    with pytest.raises(cycle.SummaryError, match=r"seed 0 is also in .*machine0"):
        cycle.load_summaries([paths[0], paths[0] / cycle.SUMMARY_FILE])
    broken = paths[1] / cycle.SUMMARY_FILE
    data = json.loads(broken.read_text())
    data["results"][2]["metrics"].pop("r1_mean")
    broken.write_text(json.dumps(data))
    with pytest.raises(cycle.SummaryError, match=r"seed1/summary.json: results\[2\] \('filter-only'\): "
                                                 r"field 'metrics.r1_mean'"):
        cycle.load_summaries(paths[:2])
    del data["quality"]
    broken.write_text(json.dumps(data))
    with pytest.raises(cycle.SummaryError, match=r"seed1/summary.json: field 'quality' is missing"):
        cycle.load_summaries([broken])
    broken.write_text("{not json")
    assert cycle.combine([str(paths[0]), str(broken)]) == 2
    assert f"error: {broken}: cannot read a seed summary" in capsys.readouterr().err
    with pytest.raises(cycle.SummaryError, match="no seed summary"):
        cycle.load_summaries([])


def test_only_names_the_controls_that_need_no_capfilt_round():
    import pytest

    assert cycle.parse_only(" oracle, human-only,oracle") == ["oracle", "human-only"]
    assert cycle.parse_only(None) == []
    with pytest.raises(SystemExit, match="filter-only cannot run alone; choose from human-only, oracle"):
        cycle.parse_only("oracle,filter-only")
    text, met, detail = cycle.oracle_target({0: {"oracle": 84.0}, 1: {"oracle": 86.0}, 2: {"oracle": 85.0}})
    assert text.startswith("(c)") and met and detail == "sd 1.00 (per seed 84.0, 86.0, 85.0)"
    assert not cycle.oracle_target({0: {"oracle": 84.0}})[1]  # one seed: no spread to judge


def test_a_two_round_report_also_judges_round_0_and_each_round_against_the_one_before():
    # the targets judge the last round; round 0's outcomes (against its own filter-only) and the
    # paired round-to-round differences are printed below them, marked informational
    names = ("pretrained", "round 0", "round 1", "filter-only", "filter-only (round 1)", "oracle")
    rows = [(10.0, 20.0, 24.0, 25.0, 21.0, 26.0), (11.0, 22.0, 25.0, 26.0, 22.0, 27.0),
            (12.0, 21.0, 20.0, 27.0, 23.0, 28.0)]
    per_seed = {s: dict(zip(names, r)) for s, r in enumerate(rows)}
    got = cycle.earlier_rounds(per_seed, 1)
    assert got[1].startswith("=== earlier rounds")
    assert any(line.startswith("[NOT MET] round 0 beats its filter-only") and "-5.00 +- 1.00" in line
               for line in got)
    step = [line for line in got if line.startswith("round 1 - round 0")]
    assert step == ["round 1 - round 0: +2.00 +- 2.65 (per seed +4.0, +3.0, -1.0); ahead in 2 of 3 seeds; "
                    "the mean is inside one sd of the per-seed differences: not a robust effect"]
    assert cycle.earlier_rounds(per_seed, 0) == []
