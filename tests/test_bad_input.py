"""The bad-input corpus (tests/bad_input_cases.py): every case is refused as one line `error: ...`, exit
code 2, no run directory, Ray never started. In-process through evomerge.cli.main (fast), plus a few
cases as the real command in a subprocess."""
import importlib.util
import subprocess
import sys

import pytest

from bad_input_cases import CASES, ROOT, Env, Shared, problems, snapshot

BY_ID = {c.id: c for c in CASES}
SUBPROCESS = ["bool-max-evals", "lm_tasks-latin1", "api-bom"]


def test_case_ids_are_unique_and_the_corpus_is_large():
    assert len(BY_ID) == len(CASES)
    assert len(CASES) >= 45
    assert all(i in BY_ID for i in SUBPROCESS)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return Shared(tmp_path_factory.mktemp("bad_input"))


def _skip_unmet(case):
    for pkg in case.needs:
        if importlib.util.find_spec(pkg) is None:
            pytest.skip(f"needs {pkg}")


def _ray_started() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_refused_in_one_line(case, shared, tmp_path, capfd):
    from evomerge.cli import main

    _skip_unmet(case)
    assert not _ray_started()
    env = Env(shared, tmp_path)
    argv = env.argv(case)
    before = snapshot(env.kept(case))
    capfd.readouterr()
    rc = main(argv)
    err = capfd.readouterr().err
    assert not problems(case, env, rc, err, before), (argv, err)
    assert not _ray_started()


@pytest.mark.parametrize("case_id", SUBPROCESS)
def test_refused_in_one_line_by_the_real_command(case_id, shared, tmp_path):
    case = BY_ID[case_id]
    _skip_unmet(case)
    env = Env(shared, tmp_path)
    argv = env.argv(case)
    before = snapshot(env.kept(case))
    r = subprocess.run([sys.executable, "run.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert not problems(case, env, r.returncode, r.stderr, before), (argv, r.stderr)
    assert r.stdout == ""


@pytest.mark.parametrize("flavor", ["lm_tasks", "api", "lm_eval"])
def test_the_same_configs_over_good_files_pass_the_checks(flavor, shared, tmp_path, monkeypatch):
    from bad_input_cases import CONTROLS
    from evomerge.config import load_config
    from evomerge.engine import preflight
    from evomerge.fitness import api

    case = CONTROLS[flavor]
    _skip_unmet(case)
    reached = []
    monkeypatch.setattr(api, "_check_reachable", lambda cfg: reached.append(cfg))  # no server here
    argv = Env(shared, tmp_path).argv(case)
    cfg = load_config(argv[argv.index("--config") + 1])
    preflight(cfg)
    assert len(reached) == (flavor == "api")
