"""λ grids and trade-off figures: nets.float_grid, run_grid, summarize and draw_tradeoff.

run_grid is driven by a fake mode script that calls the real nets.check_out (so a wrong
resume flag fails the way a real run would) and writes results derived from its λ.
"""
import argparse
import csv
import math

import numpy as np
import pytest
from PIL import Image

import nets


def parse_grid(text):
    parser = argparse.ArgumentParser()
    parser.add_argument("--lambda-sim", type=nets.float_grid)
    return parser.parse_args([f"--lambda-sim={text}"]).lambda_sim  # "=": -1 is no option


def test_float_grid_keeps_the_given_order():
    assert parse_grid("0,0.4,1") == (0.0, 0.4, 1.0)
    assert parse_grid("2") == (2.0,)
    assert parse_grid("1, 0.5 ,0") == (1.0, 0.5, 0.0)  # not sorted; spaces allowed
    assert all(type(v) is float for v in parse_grid("3,1"))


@pytest.mark.parametrize("text, named, reason", [
    ("", "''", "empty"), ("0,,1", "'0,,1'", "empty"), ("0,", "'0,'", "empty"),
    ("0,abc", "'abc'", "invalid number"), ("1,nan", "'nan'", "not a finite"),
    ("0,inf", "'inf'", "not a finite"), ("-1", "'-1'", "negative"),
    ("0.4,1,0.40", "'0.40'", "repeats")])
def test_float_grid_refusals(text, named, reason, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_grid(text)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--lambda-sim" in err and named in err and reason in err


def test_grid_folder_names_the_knob_and_value(tmp_path):
    assert nets.grid_folder(tmp_path, "lambda_sim", 0.4) == tmp_path / "lambda_sim=0.4"
    assert nets.grid_folder(str(tmp_path), "jpeg_quality", 50.0) == tmp_path / "jpeg_quality=50"


def test_grid_folders_are_as_distinct_as_the_values(tmp_path):
    assert nets.grid_folder(tmp_path, "lambda_sim", 0.1000001).name == "lambda_sim=0.1000001"
    args, main = grid_args(tmp_path, (0.1000001, 0.1000002, 0.1)), FakeMain()
    nets.run_grid(main, args, "lambda_sim")
    assert len(main.calls) == 3 and len({c.out for c in main.calls}) == 3
    rows = nets.summarize([tmp_path / "grid"], tmp_path, "test_bpd_simplified", [])
    assert [r["lambda_sim"] for r in rows] == [0.1, 0.1000001, 0.1000002]


def toy_results(lam):
    """What the fake mode script reports for λ: bpd and accuracy fall with λ."""
    return dict(lambda_sim=lam, test_bpd=3.0, test_bpd_simplified=3.0 - lam / 2,
                test_acc=0.9, test_acc_simplified=0.9 - lam / 10, dataset="toy")


class FakeMain:
    """A mode script's main(args): check_out, args.json, then results.json (unless λ is
    in `interrupt_at`, which stops after args.json like a Ctrl-C)."""

    def __init__(self, interrupt_at=()):
        self.calls, self.interrupt_at, self.csv_rows_seen = [], interrupt_at, []

    def __call__(self, args):
        self.calls.append(argparse.Namespace(**vars(args)))
        csv_path = nets.Path(args.out).parent / "tradeoff.csv"
        self.csv_rows_seen.append(len(read_csv(csv_path)) if csv_path.exists() else 0)
        nets.check_out(args.out, vars(args), args.resume)
        nets.write_json(nets.Path(args.out) / "args.json", vars(args))
        if args.lambda_sim in self.interrupt_at:
            raise KeyboardInterrupt
        nets.write_json(nets.Path(args.out) / "results.json", toy_results(args.lambda_sim))


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def grid_args(tmp_path, values=(1.0, 0.0, 0.5)):
    return argparse.Namespace(lambda_sim=values, out=str(tmp_path / "grid"), resume=False,
                              grid_index=7, seed=3)


def test_run_grid_runs_each_value_into_its_folder_in_order(tmp_path):
    args, main = grid_args(tmp_path), FakeMain()
    results = nets.run_grid(main, args, "lambda_sim")
    assert [c.lambda_sim for c in main.calls] == [1.0, 0.0, 0.5]  # grid order, scalars
    assert [c.out for c in main.calls] == [str(tmp_path / "grid" / f"lambda_sim={v}")
                                           for v in ("1", "0", "0.5")]
    assert all(c.resume is False and c.grid_index is None and c.seed == 3 for c in main.calls)
    assert results == [toy_results(v) for v in (1.0, 0.0, 0.5)]
    assert args.lambda_sim == (1.0, 0.0, 0.5) and args.grid_index == 7  # caller's args intact


def test_run_grid_skips_finished_and_resumes_interrupted_values(tmp_path, capsys):
    args = grid_args(tmp_path, (0.0, 0.5, 1.0))
    with pytest.raises(KeyboardInterrupt):
        nets.run_grid(FakeMain(interrupt_at=(0.5,)), args, "lambda_sim")
    main = FakeMain()
    results = nets.run_grid(main, args, "lambda_sim")
    # 0 finished earlier: skipped; 0.5 has args.json only: resumed; 1 never started: new run
    assert [(c.lambda_sim, c.resume) for c in main.calls] == [(0.5, True), (1.0, False)]
    assert results == [toy_results(v) for v in (0.0, 0.5, 1.0)]
    assert "lambda_sim=0 is finished; skipped" in capsys.readouterr().out
    again = FakeMain()
    assert nets.run_grid(again, args, "lambda_sim") == results and again.calls == []


def test_run_grid_index_runs_one_value(tmp_path):
    args, main = grid_args(tmp_path), FakeMain()
    assert nets.run_grid(main, args, "lambda_sim", grid_index=2) == [toy_results(0.5)]
    assert [c.lambda_sim for c in main.calls] == [0.5]
    assert sorted(p.name for p in (tmp_path / "grid").iterdir()) == ["lambda_sim=0.5"]
    for bad in (3, -1):
        with pytest.raises(nets.RunError, match="use 0 to 2"):
            nets.run_grid(main, args, "lambda_sim", grid_index=bad)
    assert len(main.calls) == 1


def test_run_grid_summarizes_after_each_value(tmp_path):
    args, main = grid_args(tmp_path), FakeMain()
    summary = dict(x_key="test_bpd_simplified", series=[("simplified", "test_acc_simplified")],
                   ref_key="test_bpd")
    nets.run_grid(main, args, "lambda_sim", summary=summary)
    assert main.csv_rows_seen == [0, 1, 2]  # each value sees the summary of those before it
    rows = read_csv(tmp_path / "grid" / "tradeoff.csv")
    assert [float(r["lambda_sim"]) for r in rows] == [0.0, 0.5, 1.0]
    assert Image.open(tmp_path / "grid" / "tradeoff.png").size == (800, 560)


def make_grid(folder, lambdas, extra=None):
    """results.json of finished runs in grid_folder(folder, lambda_sim, λ); returns them."""
    runs = {}
    for lam in lambdas:
        results = {**toy_results(lam), "curve": [lam, 1.0], "cfg": {"a": 1},  # not scalars
                   **(extra or {}).get(lam, {})}
        nets.write_json(nets.grid_folder(folder, "lambda_sim", lam) / "results.json", results)
        runs[lam] = results
    return runs


def test_summarize_csv_matches_results_sorted_by_knob(tmp_path):
    grid = tmp_path / "grid"
    # written out of order; "lambda_sim=10" sorts before "lambda_sim=2" as text, not as a number
    runs = make_grid(grid, [10.0, 0.5, 2.0], extra={2.0: {"retrain_test_acc": 0.75, "ok": True}})
    (grid / "quick-glow").mkdir()
    (grid / "quick-glow" / "glow.pt").write_bytes(b"cache")
    nets.write_json(grid / "lambda_sim=3" / "args.json", {"lambda_sim": 3.0})  # unfinished
    returned = nets.summarize([grid], tmp_path, "test_bpd_simplified",
                              [("simplified", "test_acc_simplified")], knob="lambda_sim")
    with open(tmp_path / "tradeoff.csv", newline="") as f:
        header = next(csv.reader(f))
    rows = read_csv(tmp_path / "tradeoff.csv")
    scalar_keys = ["lambda_sim", "test_bpd", "test_bpd_simplified", "test_acc",
                   "test_acc_simplified", "dataset", "retrain_test_acc", "ok"]
    assert header == ["run"] + scalar_keys  # lists and dicts (curve, cfg) are left out
    assert [r["run"] for r in rows] == ["grid/lambda_sim=0.5", "grid/lambda_sim=2",
                                        "grid/lambda_sim=10"]
    for row, lam in zip(rows, [0.5, 2.0, 10.0]):
        for key in scalar_keys:
            want = runs[lam].get(key)
            if want is None:
                assert row[key] == ""
            elif isinstance(want, float):
                assert float(row[key]) == want
            else:
                assert row[key] == str(want)
    assert [r["run"] for r in returned] == [r["run"] for r in rows]


def test_summarize_knob_from_folder_name(tmp_path):
    """A baseline whose results.json lacks its knob: the value comes from the folder name."""
    for sigma in (2.0, 0.5):
        nets.write_json(nets.grid_folder(tmp_path / "blur", "blur_sigma", sigma) / "results.json",
                        {"test_acc": 0.5 + sigma / 10})
    rows = nets.summarize([tmp_path / "blur"], tmp_path, "test_bpd", [("blur", "test_acc")])
    with open(tmp_path / "tradeoff.csv", newline="") as f:
        assert list(csv.reader(f)) == [["run", "blur_sigma", "test_acc"],
                                       ["blur/blur_sigma=0.5", "0.5", "0.55"],
                                       ["blur/blur_sigma=2", "2.0", "0.7"]]
    assert [r["blur_sigma"] for r in rows] == [0.5, 2.0]
    # a knob named by the caller is not read from a folder named after another knob
    rows = nets.summarize([tmp_path / "blur"], tmp_path, "test_bpd", [], knob="lambda_sim")
    assert [r["lambda_sim"] for r in rows] == [None, None]


def test_summarize_series_per_grid_folder(tmp_path, monkeypatch):
    drawn = {}
    monkeypatch.setattr(nets, "draw_tradeoff", lambda path, series, *a, **kw: drawn.update(
        series=series, ref_x=kw["ref_x"]))
    simple = make_grid(tmp_path / "simplebits", [1.0, 0.0])
    blur = make_grid(tmp_path / "blur", [2.0], extra={2.0: {"test_bpd": 4.0}})
    del simple[0.0]["test_acc_simplified"]
    nets.write_json(tmp_path / "simplebits" / "lambda_sim=0" / "results.json", simple[0.0])
    nets.summarize([tmp_path / "simplebits", tmp_path / "blur"], tmp_path, "test_bpd_simplified",
                   [("simplified", "test_acc_simplified"), ("original", "test_bpd", "test_acc")],
                   ref_key="test_bpd")

    def points(runs, x_key, y_key):
        return [(r[x_key], r[y_key], f"lambda_sim={lam:g}") for lam, r in sorted(runs.items())
                if y_key in r]
    assert drawn["series"] == [
        ("simplebits: simplified", points(simple, "test_bpd_simplified", "test_acc_simplified")),
        ("simplebits: original", points(simple, "test_bpd", "test_acc")),
        ("blur: simplified", points(blur, "test_bpd_simplified", "test_acc_simplified")),
        ("blur: original", points(blur, "test_bpd", "test_acc"))]
    assert len(drawn["series"][0][1]) == 1  # λ=0 lacks test_acc_simplified: not drawn
    assert drawn["ref_x"] == pytest.approx((3.0 + 3.0 + 4.0) / 3)


def test_summaries_skip_what_they_cannot_read_and_grids_rerun_it(tmp_path, capsys):
    make_grid(tmp_path / "grid", [0.0, 0.5, 1.0, 2.0])
    bad = {0.5: "{\"lambda_sim\": 0.5, \"test_", 1.0: "[1, 2]", 2.0: "\"text\""}
    for lam, text in bad.items():
        (nets.grid_folder(tmp_path / "grid", "lambda_sim", lam) / "results.json").write_text(text)
    rows = nets.summarize([tmp_path / "grid"], tmp_path, "test_bpd_simplified",
                          [("simplified", "test_acc_simplified")])
    assert [r["lambda_sim"] for r in rows] == [0.0]
    err = capsys.readouterr().err
    assert all(f"skipped {tmp_path / 'grid' / f'lambda_sim={v:g}' / 'results.json'}" in err
               for v in bad)
    # a grid with an unreadable results.json runs that value again and goes on
    args, main = grid_args(tmp_path, (0.0, 0.5, 1.0, 2.0)), FakeMain()
    for lam in args.lambda_sim:
        nets.write_json(nets.grid_folder(tmp_path / "grid", "lambda_sim", lam) / "args.json",
                        {**vars(args), "lambda_sim": lam, "grid_index": None,
                         "out": str(nets.grid_folder(tmp_path / "grid", "lambda_sim", lam))})
    results = nets.run_grid(main, args, "lambda_sim")
    assert results[0]["lambda_sim"] == 0.0 and results[0]["curve"] == [0.0, 1.0]  # kept
    assert results[1:] == [toy_results(v) for v in (0.5, 1.0, 2.0)]
    assert [c.lambda_sim for c in main.calls] == [0.5, 1.0, 2.0]


def test_two_grids_of_the_same_folder_name_get_distinct_rows_and_legends(tmp_path, monkeypatch):
    drawn = {}
    monkeypatch.setattr(nets, "draw_tradeoff", lambda path, series, *a, **kw: drawn.update(
        series=series))
    for version in ("v1", "v2"):
        make_grid(tmp_path / version / "grid", [0.0])
    rows = nets.summarize([tmp_path / "v1" / "grid", tmp_path / "v2" / "grid"], tmp_path,
                          "test_bpd_simplified", [("simplified", "test_acc_simplified")])
    assert [r["run"] for r in rows] == ["v1/grid/lambda_sim=0", "v2/grid/lambda_sim=0"]
    assert [label for label, _ in drawn["series"]] == ["v1/grid: simplified", "v2/grid: simplified"]


# ---- the chart ----

def colour_mask(img, colour):
    return np.all(np.asarray(img.convert("RGB")) == colour, axis=-1)  # (H, W)


def plot_frame(img):
    """(left, top, right, bottom) of the plot box: the long black lines of the image."""
    black = colour_mask(img, (0, 0, 0))
    cols = np.flatnonzero(black.sum(0) > 200)
    rows = np.flatnonzero(black.sum(1) > 400)
    return cols.min(), rows.min(), cols.max(), rows.max()


def test_chart_markers_land_where_the_mapping_says(tmp_path):
    series = [("SimpleBits", [(3.3, 0.90, "lambda_sim=0"), (2.8, 0.85, "lambda_sim=0.5"),
                              (1.9, 0.62, "lambda_sim=2")]),
              ("blur", [(3.1, 0.50, "blur_sigma=1"), (2.2, 0.41, "blur_sigma=2")]),
              ("solo", [(2.5, 0.75, "lambda_sim=1")])]
    to_pixel = nets.draw_tradeoff(tmp_path / "t.png", series, "bits per dimension",
                                  "test accuracy (%)", ref_x=2.5)
    img = Image.open(tmp_path / "t.png")
    assert img.size == (800, 560) and img.mode == "RGB"
    left, top, right, bottom = plot_frame(img)
    for i, (_, points) in enumerate(series):
        mask = colour_mask(img, nets.COLOURS[i])
        for x, y, _ in points:
            col, row = to_pixel(x, y)
            assert left < col < right and top < row < bottom
            assert mask[row - 1:row + 2, col - 1:col + 2].all()  # the marker's centre
            assert mask[row - 6:row + 7, col - 6:col + 7].sum() >= 60  # a marker, not a line
            # the same bpd at an accuracy no run has (25 points lower): empty
            wrong_row = to_pixel(x, y - 0.25)[1]
            assert not mask[wrong_row - 6:wrong_row + 7, col - 6:col + 7].any()
    # the mapping is linear, bpd grows to the right and accuracy upwards (in %: 0.75 -> 75)
    (c1, r1), (c2, r2), (c3, r3) = (to_pixel(x, y) for x, y in [(2, 0.5), (2.5, 0.6), (3, 0.7)])
    assert c1 < c2 < c3 and r1 > r2 > r3 and c3 - c2 == pytest.approx(c2 - c1, abs=1)
    assert r3 - r2 == pytest.approx(r2 - r1, abs=1)
    # the lone marker, found by its colour alone, is where the mapping puts it
    rows, cols = np.nonzero(colour_mask(img, nets.COLOURS[2])[:bottom])
    assert (cols.mean(), rows.mean()) == pytest.approx(to_pixel(2.5, 0.75), abs=1)
    # the dashed reference line: at ref_x = 2.5, the lone marker's column, and nowhere else
    ref = colour_mask(img, nets.REF_COLOUR)[top:bottom]
    ref_col = cols.mean()
    dashed = np.flatnonzero(ref.sum(0) > 0.4 * (bottom - top))
    assert list(dashed) == [round(ref_col)]
    assert 0.4 < ref[:, round(ref_col)].mean() < 0.9  # dashes, not a solid line


def test_chart_axis_labels_fit_accuracy_in_percent(tmp_path):
    """Accuracies are fractions; the axis is in % and spans the points, not [0, 1]."""
    to_pixel = nets.draw_tradeoff(tmp_path / "t.png", [("a", [(2.0, 0.5, ""), (3.0, 0.9, "")])],
                                  "bits per dimension", "test accuracy (%)")
    left, top, right, bottom = plot_frame(Image.open(tmp_path / "t.png"))
    # the two points span the box but for a small margin: the axis is fitted to 50-90 %
    # and 2-3 bits/dim, not to [0, 1]
    (col2, row50), (col3, row90) = to_pixel(2.0, 0.5), to_pixel(3.0, 0.9)
    for margin, size in [(row90 - top, bottom - top), (bottom - row50, bottom - top),
                         (col2 - left, right - left), (right - col3, right - left)]:
        assert 0.02 * size < margin < 0.08 * size
    # grid lines at the nice values 50, 60, ..., 90 % and 2, 2.2, ..., 3 bits/dim
    grid = colour_mask(Image.open(tmp_path / "t.png"), (228, 228, 228))
    rows = np.flatnonzero(grid.sum(1) > 300)
    cols = np.flatnonzero(grid.sum(0) > 150)
    assert list(rows) == [to_pixel(2.0, p / 100)[1] for p in (90, 80, 70, 60, 50)]
    assert list(cols) == [to_pixel(b, 0.5)[0] for b in (2.0, 2.2, 2.4, 2.6, 2.8, 3.0)]


@pytest.mark.parametrize("points", [[(2.0, 0.5, "only")], [(2.0, 0.5, "a"), (2.0, 0.7, "b")],
                                    [(2.0, 0.6, "a"), (2.0, 0.6, "b")]])
def test_chart_single_point_and_equal_values(tmp_path, points):
    to_pixel = nets.draw_tradeoff(tmp_path / "t.png", [("s", points)], "bpd", "acc")
    img = Image.open(tmp_path / "t.png")
    left, top, right, bottom = plot_frame(img)
    mask = colour_mask(img, nets.COLOURS[0])
    for x, y, _ in points:
        col, row = to_pixel(x, y)
        assert left < col < right and top < row < bottom
        assert mask[row - 1:row + 2, col - 1:col + 2].all()


@pytest.mark.parametrize("lo, hi", [(0, 1), (1.62, 3.41), (41.5, 93.2), (0.001, 0.0047), (3, 3.04)])
def test_nice_ticks(lo, hi):
    ticks = nets._nice_ticks(lo, hi)
    steps = np.diff(ticks)
    assert 3 <= len(ticks) <= 13 and np.allclose(steps, steps[0])
    mantissa = steps[0] / 10 ** math.floor(math.log10(steps[0]))
    assert any(math.isclose(mantissa, m) for m in (1, 2, 2.5, 5))
    assert lo - 1e-12 <= ticks[0] < lo + steps[0] and hi - steps[0] < ticks[-1] <= hi + 1e-12
    assert all(math.isclose(t / steps[0], round(t / steps[0]), abs_tol=1e-9) for t in ticks)
