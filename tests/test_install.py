"""What a user gets outside the checkout: the project installed from its wheel into a fresh virtual
environment runs `evomerge` from any directory; exported files work from any directory (mergekit YAML
with absolute model paths) and, like model files the search saves, have the permissions of the other
files a run writes (the umask's, not safetensors' 0600)."""
import json
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from hf_models import tiny_family

ROOT = Path(__file__).resolve().parent.parent  # the checkout: only the wheel is built from it
UMASK = 0o022


@pytest.fixture
def umask():
    """A known umask (0644 files, 0755 directories), so that 0600 cannot pass for the umask's mode."""
    old = os.umask(UMASK)
    yield UMASK
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def assert_plain_modes(*roots: Path) -> None:
    for root in roots:
        for p in [root, *root.rglob("*")] if root.is_dir() else [root]:
            want = (0o777 if p.is_dir() else 0o666) & ~UMASK
            assert mode(p) == want, f"{p}: {oct(mode(p))}, not {oct(want)}"


# installed from the wheel ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv with the project's wheel installed (--no-deps); the big dependencies (torch, ray, ...)
    are the test interpreter's, seen through a .pth path line. A plain path line adds that site-packages
    to sys.path without processing its own .pth files, so the checkout's editable-install finder stays out."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"  # a copy of what the wheel holds: the build writes build/ and *.egg-info beside it
    src.mkdir()
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, src / f)
    for pkg in ("evomerge", "fitness", "populations"):  # the folders; they install as evomerge.*
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "wheels"), str(src)],
                   check=True, timeout=300)
    wheel, = (tmp / "wheels").glob("evomerge-*.whl")
    env = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    python = env / "bin" / "python"
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)], check=True,
                   timeout=300)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site) / "_evomerge_test_deps.pth").write_text("".join(f"{p}\n" for p in sorted(deps)))
    where = subprocess.run([str(python), "-c", "import evomerge; print(evomerge.__file__)"], cwd=tmp,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).resolve().is_relative_to(Path(site).resolve()), where  # the installed copy, not ROOT
    return env


def test_the_installed_command_runs_the_quickstart_outside_the_checkout(venv, tmp_path):
    evomerge = str(venv / "bin" / "evomerge")
    r = subprocess.run([evomerge, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: evomerge ") and "run.py" not in r.stdout
    shutil.copy(ROOT / "configs" / "quickstart.yaml", tmp_path / "quickstart.yaml")
    r = subprocess.run([evomerge, "--config", "quickstart.yaml", "--set", "budget.max_evals=500", "--out", "run",
                        "--no-progress"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "run.py" not in r.stdout + r.stderr
    run = tmp_path / "run"
    assert len((run / "evals.jsonl").read_text().splitlines()) == 500
    assert (run / "summary.json").exists()
    assert_plain_modes(run / "best")  # the digits MLP's model.safetensors too, not safetensors' 0600
    for f in run.rglob("*"):
        if f.is_file():
            assert b"run.py" not in f.read_bytes(), f


def test_fitness_and_populations_install_inside_the_package(venv, tmp_path):
    """Installed names cannot collide with other projects': no top-level `fitness` or `populations`."""
    python = venv / "bin" / "python"
    code = ("import importlib.util as u, evomerge.fitness as f, evomerge.populations as p; "
            "print(f.__file__); print(p.__file__); print(u.find_spec('fitness'), u.find_spec('populations'))")
    r = subprocess.run([str(python), "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    fit, pop, top = r.stdout.splitlines()
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip()).resolve()
    assert Path(fit).resolve() == site / "evomerge" / "fitness" / "__init__.py"
    assert Path(pop).resolve() == site / "evomerge" / "populations" / "__init__.py"
    assert top == "None None"


def test_the_package_list_names_every_package_folder():
    """pyproject.toml lists the packages the wheel holds: every folder with an __init__.py under evomerge/, and
    the two folders beside it that install inside it."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"evomerge", "evomerge.fitness", "evomerge.populations"}
    found |= {"evomerge." + ".".join(p.parent.relative_to(ROOT / "evomerge").parts)
              for p in (ROOT / "evomerge").rglob("__init__.py") if p.parent != ROOT / "evomerge"}
    for name in ("fitness", "populations"):
        found |= {f"evomerge.{name}." + ".".join(p.parent.relative_to(ROOT / name).parts)
                  for p in (ROOT / name).rglob("__init__.py") if p.parent != ROOT / name}
    assert listed == found


# exports ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def made_run(tmp_path_factory):
    """A run directory (config.yaml, evals.jsonl with one recipe) whose config names its models by paths
    relative to where it was made, as a user writes them; no search needed to export its evaluation 0."""
    from evomerge.config import load_config
    from evomerge.spaces import build_space

    root = tmp_path_factory.mktemp("export")
    tiny_family(root / "models", experts=("a", "b"))
    (root / "add.jsonl").write_text(json.dumps({"prompt": "1+2=", "answer": "3"}) + "\n")
    cfg = {"space": {"name": "hf_merge", "method": "ties", "layer_granularity": 0, "cache_dir": "tv",
                     "models": {"base": "models/base", "experts": {"a": "models/a", "b": "models/b"}}},
           "strategy": {"name": "random"},
           "fitness": {"name": "lm_tasks", "tasks": [{"name": "add", "path": "add.jsonl", "kind": "generate"}]}}
    (root / "run").mkdir()
    (root / "run" / "config.yaml").write_text(yaml.safe_dump(cfg))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        c = load_config("run/config.yaml")
        space = build_space(c.space, c.seed)
        recipe = space.decode((space.lower + space.upper) / 2)
    finally:
        os.chdir(cwd)
    (root / "run" / "evals.jsonl").write_text(json.dumps({"id": 0, "recipe": recipe}) + "\n")
    return root


def export(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "evomerge", "export", "run", "--eval-id", "0", *args], cwd=root,
                          capture_output=True, text=True, timeout=300)


def test_export_writes_absolute_model_paths_and_plain_permissions(made_run, umask):
    r = export(made_run, "--to", "merged", "--mergekit", "merge.yaml")
    assert r.returncode == 0, r.stderr
    mk = yaml.safe_load((made_run / "merge.yaml").read_text())
    paths = [mk["base_model"], *(m["model"] for m in mk["models"])]
    assert paths == [str((made_run / "models" / m).resolve()) for m in ("base", "a", "b")]  # from any directory
    assert (made_run / "merged" / "model.safetensors").exists() and (made_run / "merged" / "recipe.json").exists()
    assert_plain_modes(made_run / "merged", made_run / "merge.yaml")
    assert not [p.name for p in made_run.iterdir() if p.name.startswith(".")]  # no temporary left


def test_every_export_refusal_comes_before_anything_is_written(made_run, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    (tmp_path / "a_file").write_text("")
    cases = [(("--to", str(tmp_path / "full")), f"--to {tmp_path / 'full'}: already exists and is not empty"),
             (("--to", str(tmp_path / "a_file")), f"--to {tmp_path / 'a_file'}: exists and is not a directory")]
    for to, message in cases:
        r = export(made_run, *to, "--mergekit", str(tmp_path / "m.yaml"))
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: {message}"]
        assert not (tmp_path / "m.yaml").exists()
    r = export(made_run, "--to", str(tmp_path / "new"), "--mergekit", str(tmp_path / "no" / "m.yaml"))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: --mergekit {tmp_path / 'no' / 'm.yaml'}: no directory {tmp_path / 'no'}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "full"]


def test_a_saved_best_model_and_a_stacked_model_get_plain_permissions(made_run, tmp_path, umask):
    from evomerge.config import load_config
    from evomerge.passthrough import stack_layers
    from evomerge.spaces import build_space

    cwd = os.getcwd()
    os.chdir(made_run)
    try:
        c = load_config("run/config.yaml")
        space = build_space(c.space, c.seed)
        space.save((space.lower + space.upper) / 2, tmp_path / "best", {"eval_id": 0})  # what a worker writes
    finally:
        os.chdir(cwd)
    assert (tmp_path / "best" / "model.safetensors").exists()
    models = {k: made_run / "models" / k for k in ("base", "a")}
    stack_layers(models["base"], models, [{"model": "a", "layers": [0, 2]}], tmp_path / "stacked")
    assert_plain_modes(tmp_path / "best", tmp_path / "stacked")
