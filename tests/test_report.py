"""`python run.py report`: plots and Markdown from run directories (one real M2N2 run and one CMA-ES run
with two objectives, reused), the time stamps and strategy statistics the engine logs for them, old
run directories, bad input, and the strategies' statistics themselves."""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from evomerge.cli import main
from evomerge.populations import Result, SpaceInfo, build_strategy
from evomerge.populations.cmaes import CMAESConfig
from evomerge.populations.m2n2 import M2N2Config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Short M2N2 and CMA-ES runs on the synthetic fitness with two tasks (two objectives), each with two
    workers in process (InProcessPool: the engine, its logs and the run directory as on Ray, in a second)."""
    from evomerge.config import validate
    from test_engine_local import new_run

    tmp = tmp_path_factory.mktemp("report")
    base = {"seed": 1, "space": {"name": "synthetic", "dim": 8},
            "fitness": {"name": "synthetic", "n_tasks": 2, "n_examples": 20},
            "engine": {"workers": 2, "batch_size": 4, "cpus_per_worker": 0.5}}
    strategies = {"m2n2": ({"name": "m2n2", "archive_size": 8}, 600),
                  "cma": ({"name": "cmaes", "popsize": 8, "diagonal": True, "sigma0": 0.3}, 240)}
    for name, (strategy, n) in strategies.items():
        new_run(tmp / name, validate({**base, "strategy": strategy, "budget": {"max_evals": n}}))
    return tmp / "m2n2", tmp / "cma"


def records(run):
    return [json.loads(line) for line in (run / "evals.jsonl").read_text().splitlines()]


def assert_drawn(png, min_fraction=0.02):
    """A real picture: a reasonable size and enough pixels that are not the white background."""
    img = imread(png)
    assert img.shape[0] >= 300 and img.shape[1] >= 400, (png, img.shape)
    ink = np.any(img[..., :3] < 0.92, axis=-1).mean()
    assert ink > min_fraction, (png, ink)


def pngs_of(report_dir):
    written = {p.name for p in report_dir.glob("*.png")}
    md = (report_dir / "report.md").read_text()
    assert set(re.findall(r"\]\(([\w-]+\.png)\)", md)) == written  # every image embedded, none missing
    for name in written:
        assert_drawn(report_dir / name)
    return written, md


def test_the_engine_logs_time_stamps_and_strategy_statistics(runs):
    m2n2, cma = runs
    for run in runs:
        t = [r["t"] for r in records(run)]
        assert all(b >= a for a, b in zip(t, t[1:]))  # told in file order, search seconds
        summary = json.loads((run / "summary.json").read_text())
        assert 0 < t[-1] <= summary["search_seconds"] + 1e-3
        stats = [json.loads(line) for line in (run / "strategy.jsonl").read_text().splitlines()]
        assert stats[-1]["evals"] == summary["evaluations"]  # the final line
        assert [s["evals"] for s in stats] == sorted({s["evals"] for s in stats})
        assert len(stats) <= 501
    last = json.loads((m2n2 / "strategy.jsonl").read_text().splitlines()[-1])
    assert last["members"] == 8 and 0 < last["diversity"] < 2 and 0 < last["coverage"] <= 1
    assert last["archive_best_fitness"] <= 1e-12 + (json.loads((m2n2 / "summary.json").read_text())
                                                         ["best"]["fitness"])
    last = json.loads((cma / "strategy.jsonl").read_text().splitlines()[-1])
    assert last["sigma"] > 0 and last["generation"] == 30 and "generation_best" in last
    events = [json.loads(line) for line in (m2n2 / "workers.jsonl").read_text().splitlines()]
    assert all("t" in e for e in events)


def test_report_of_an_m2n2_run_through_the_command(runs, cli):
    m2n2, _ = runs
    r = cli("report", str(m2n2))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(m2n2 / "report" / "report.md")
    written, md = pngs_of(m2n2 / "report")
    assert written == {"fitness.png", "tasks.png", "strategy.png", "archive.png", "pareto.png", "workers.png"}
    for text in ("m2n2 / synthetic / synthetic", "max_evals", "600 (0 failed", "evaluations/s", "holdout_score",
                 "coverage", "task0_accuracy, task1_accuracy"):
        assert text in md
    assert not list(m2n2.glob(".report*"))  # no temporary left behind


def test_report_of_two_runs_with_a_pareto_plot_and_an_overlay(runs, tmp_path, capsys):
    m2n2, cma = runs
    out = tmp_path / "compare"
    assert main(["report", str(cma), str(m2n2), "--label", "CMA-ES", "--label", "M2N2", "--out", str(out)]) == 0
    written, md = pngs_of(cma / "report")
    assert written == {"fitness.png", "tasks.png", "strategy.png", "pareto.png", "workers.png"}
    assert "task0_accuracy, task1_accuracy" in md and "Pareto front" in md
    written, md = pngs_of(out)
    assert written == {"best.png"}
    rows = [line for line in md.splitlines() if line.startswith("| CMA-ES") or line.startswith("| M2N2")]
    assert len(rows) == 2 and "| 240 |" in rows[0] and "| 600 |" in rows[1]
    assert (m2n2 / "report" / "archive.png").exists()  # each run's own report as well


def test_an_old_run_directory_without_time_stamps_still_reports(runs, tmp_path):
    m2n2, _ = runs
    old = tmp_path / "old"
    shutil.copytree(m2n2, old, ignore=shutil.ignore_patterns("report*"))
    recs = records(old)
    for r in recs:
        del r["t"]
    (old / "evals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (old / "strategy.jsonl").unlink()
    (old / "summary.json").unlink()
    assert main(["report", str(old)]) == 0
    written, md = pngs_of(old / "report")
    assert written == {"fitness.png", "tasks.png", "archive.png", "pareto.png"}  # nothing over time, no statistics
    assert "no time stamp" in md and "no strategy.jsonl" in md and "no summary.json" in md
    assert f"{max(r['fitness'] for r in recs):.6g}" in md  # the best, from the records


def test_an_archive_that_cannot_be_read_is_said_for_strategies_that_keep_one(runs, tmp_path):
    """M2N2 keeps an archive (Strategy.has_archive): without its checkpoint, report.md says why archive.png
    is missing; CMA-ES keeps none, and says nothing of one."""
    notes = {}
    for name, run in zip(("m2n2", "cma"), runs):
        copy = tmp_path / name
        shutil.copytree(run, copy, ignore=shutil.ignore_patterns("report*", "checkpoint.pkl"))
        assert main(["report", str(copy)]) == 0
        written, md = pngs_of(copy / "report")
        assert "archive.png" not in written
        notes[name] = "no scored archive in checkpoint.pkl: no archive.png" in md
    assert notes == {"m2n2": True, "cma": False}


def test_bad_input_is_one_line_and_exit_2(runs, tmp_path, capsys):
    m2n2, _ = runs
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: report ") and "not a run directory" in err and len(err.strip().splitlines()) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(m2n2 / "config.yaml", empty)
    (empty / "evals.jsonl").write_text("")
    assert main(["report", str(empty)]) == 2
    assert "holds no evaluation" in capsys.readouterr().err
    assert not (empty / "report").exists()
    assert main(["report", str(m2n2), str(m2n2), "--label", "one"]) == 2
    assert "one per run" in capsys.readouterr().err


def test_a_failed_report_leaves_the_previous_one_untouched(runs, tmp_path, monkeypatch):
    from evomerge.report import write

    _, cma = runs
    run = tmp_path / "run"
    shutil.copytree(cma, run, ignore=shutil.ignore_patterns("report*"))
    assert main(["report", str(run)]) == 0
    before = sorted(p.name for p in (run / "report").iterdir())

    def broken(*a, **k):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(write, "plot_pareto", broken)
    with pytest.raises(RuntimeError):
        main(["report", str(run)])
    assert sorted(p.name for p in (run / "report").iterdir()) == before
    assert [p.name for p in run.iterdir() if p.name.startswith(".") and p.name != ".lock"] == []  # no temp left


def test_busy_intervals_and_utilization():
    from evomerge.report.plots_workers import utilization

    iv = {0: np.array([[0.0, 1.0], [2.0, 3.0]]), 1: np.array([[0.0, 4.0]])}
    np.testing.assert_allclose(utilization(iv, 2, np.array([0.0, 2.0, 4.0])), [0.75, 0.75])


def _drive(strategy, rounds, dim):
    directions = np.random.default_rng(9).standard_normal((40, dim))
    for _ in range(rounds):
        cands = strategy.ask(5)
        out = []
        for c in cands:
            s = (directions @ c.x > 0).astype(np.float64)
            out.append(Result(c, float(s.mean()), s))
        strategy.tell(out)


def test_m2n2_statistics_agree_in_dense_and_coefficient_form():
    rng = np.random.default_rng(0)
    space = SpaceInfo(dim=257, seeds=tuple(rng.standard_normal((3, 257)).astype(np.float32)))
    dense = build_strategy(M2N2Config(name="m2n2", archive_size=6), space, seed=4)
    coef = build_strategy(M2N2Config(name="m2n2", archive_size=6, form="coefficients"), space, seed=4)
    assert dense.stats() == {"members": 0.0, "children_kept": 0.0}
    for st in (dense, coef):
        _drive(st, 30, 257)
    a, b = dense.stats(), coef.stats()
    assert a.keys() == b.keys() >= {"archive_mean_fitness", "archive_best_fitness", "coverage", "diversity"}
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-6)
    x = dense.archive[dense.filled].astype(np.float64)
    pairs = [((u - v) ** 2).sum() for i, u in enumerate(x) for j, v in enumerate(x) if i != j]
    assert a["diversity"] == pytest.approx(np.sqrt(np.mean(pairs) / np.mean((x ** 2).sum(axis=1))))
    assert a["coverage"] == pytest.approx(dense.scores.max(axis=0).mean())
    # the member fitness survives a checkpoint
    other = build_strategy(M2N2Config(name="m2n2", archive_size=6), space, seed=4)
    other.load_state_dict(dense.state_dict())
    assert other.stats() == pytest.approx(a, rel=1e-9)


def test_cmaes_statistics():
    space = SpaceInfo(dim=6, seeds=(np.zeros(6, np.float32),))
    st = build_strategy(CMAESConfig(name="cmaes", popsize=5, diagonal=True), space, seed=0)
    assert set(st.stats()) == {"sigma", "std_mean", "generation"}
    _drive(st, 2, 6)
    s = st.stats()
    assert s["generation"] == 2 and s["sigma"] > 0 and s["generation_best"] >= s["generation_median"]
