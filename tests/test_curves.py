"""When a run learned: loss.csv read back (vlp_core.train.curves) and its rows in the comparison table."""
import pytest

from vlp_core.train.curves import itm_settled_step, loss_summary, read_loss_log


def _log(path, itm_by_step, every=10):
    lines = ["step,loss,itc,itm,lm,lr"]
    for step in range(every, max(itm_by_step) + 1, every):
        itm = next(v for s, v in sorted(itm_by_step.items()) if step <= s)
        lines.append(f"{step},{3 + itm},{2.0 - step / 10000},{itm},1.0,0.001")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_itm_loss_settles_where_the_trailing_window_goes_under_the_level_for_good(tmp_path):
    # plateau at 0.4 to step 1000, then 0.05 to the end: the 200-step trailing mean (20 rows) first
    # goes under 0.2 with 12 low rows (8 x 0.4 + 12 x 0.05 = 3.8 < 4): 1,000 + 120 = step 1,120
    rows = read_loss_log(_log(tmp_path / "a.csv", {1000: 0.4, 3200: 0.05}))
    assert itm_settled_step(rows) == 1120
    # a relapse above the level later resets it: after a relapse to 0.5 it takes 14 low rows
    # (6 x 0.5 + 14 x 0.05 = 3.7 < 4; 7 x 0.5 + 13 x 0.05 = 4.15): 2,300 + 140
    rows = read_loss_log(_log(tmp_path / "b.csv", {1000: 0.4, 2000: 0.05, 2300: 0.5, 3200: 0.05}))
    assert itm_settled_step(rows) == 2300 + 140
    # a run that ends on the plateau never settled
    assert itm_settled_step(read_loss_log(_log(tmp_path / "c.csv", {1000: 0.05, 3200: 0.45}))) is None
    # the level and window are parameters
    assert itm_settled_step(rows, level=0.6) == 10


def test_loss_summary_gives_the_last_window_and_nothing_for_a_run_without_a_log(tmp_path):
    s = loss_summary(_log(tmp_path / "loss.csv", {1000: 0.4, 3200: 0.05}))
    assert s["steps"] == 3200 and s["itm_settled_step"] == 1120 and s["final_itm"] == pytest.approx(0.05)
    assert s["final_itc"] == pytest.approx(2.0 - sum(range(3010, 3201, 10)) / 20 / 10000)
    assert loss_summary(tmp_path / "missing.csv") == {}
    (tmp_path / "empty.csv").write_text("step,loss,itc,itm,lm,lr\n")
    assert loss_summary(tmp_path / "empty.csv") == {}


def test_a_bad_value_names_the_file_row_and_field(tmp_path):
    p = tmp_path / "loss.csv"
    p.write_text("step,loss,itc,itm,lm,lr\n10,1,1,0.4,1,0.001\n20,1,1,oops,1,0.001\n")
    with pytest.raises(ValueError, match=r"loss.csv: row 3, field 'itm': 'oops' is not a number"):
        read_loss_log(p)


def test_the_table_prints_when_each_model_learned_and_summaries_keep_it():
    from vlp_core.comparison import ModelResult, comparison_table, results_from_json, results_to_json, table_rows

    cols = [ModelResult("early", training={"final_itc": 0.71, "final_itm": 0.042, "itm_settled_step": 1320}),
            ModelResult("stuck", training={"final_itc": 3.19, "final_itm": 0.421, "itm_settled_step": None}),
            ModelResult("imported")]
    assert results_from_json(results_to_json(cols)) == cols
    assert results_from_json([{"name": "old summary"}])[0].training == {}  # summaries written before it
    rows = dict(table_rows(cols))
    assert "ITM loss < 0.2 from step" in comparison_table(cols)
    assert rows["ITM loss < 0.2 from step"] == ["1320", "never", "-"]
    assert rows["final ITM loss"] == ["0.042", "0.421", "-"]
    assert rows["final ITC loss"] == ["0.71", "3.19", "-"]
