"""The CLI's help and the README's generated reference stay complete and consistent with the code."""
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from evomerge import reference

ROOT = Path(__file__).resolve().parent.parent


def test_readme_reference_is_current():
    text = (ROOT / "README.md").read_text()
    assert reference.splice(text) == text, "run: python -m evomerge.reference --write README.md"


def _models(tp):
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    return [m for a in typing.get_args(tp) for m in _models(a)]


def test_every_config_field_is_described():
    from evomerge.fitness import FITNESSES
    from evomerge.populations import STRATEGIES

    from evomerge.config import RunConfig
    from evomerge.spaces import SPACES

    todo = [RunConfig] + [c for reg in (SPACES, STRATEGIES, FITNESSES) for c, _ in reg.values()]
    seen, missing = set(), []
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, field in model.model_fields.items():
            nested = _models(field.annotation)
            todo += nested
            if name != "name" and model is not RunConfig and not field.description:
                missing.append(f"{model.__name__}.{name}")
    assert not missing


def test_every_strategy_has_a_docs_page():
    from evomerge.populations import STRATEGIES

    for name in STRATEGIES:
        page = ROOT / "docs" / "strategies" / f"{name}.md"
        assert page.is_file(), page
        assert name in (ROOT / "docs" / "strategies" / "README.md").read_text()


COMMANDS = {  # command -> options its help must explain
    "": ["--config", "--resume", "--set", "--out", "--dry-run", "--no-progress", "export", "report", "serve",
         "zoo", "exit codes"],
    "run": ["--config", "--resume", "--set", "--dry-run"],
    "export": ["RUN_DIR", "--eval-id", "--to", "--mergekit", "--prefer"],
    "report": ["RUN_DIR"],
    "serve": ["--config", "--run", "--host", "--port", "--api-key-env", "--merge-cache"],
    "zoo": ["--out", "--size", "--skills"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_of_every_command(command):
    args = [command, "--help"] if command else ["--help"]
    out = subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: python run.py{' ' + command if command else ''}")
    for word in COMMANDS[command]:
        assert word in out.stdout, (command, word)


def test_console_script_is_run_py():
    script = Path(sys.executable).with_name("evomerge")
    if not script.exists():
        script = shutil.which("evomerge")
    assert script, "the evomerge console script is installed with the package"
    a = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    b = subprocess.run([sys.executable, "run.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert a.returncode == b.returncode == 0
    assert a.stdout.replace("evomerge", "python run.py") == b.stdout
    bad = subprocess.run([str(script), "--config", "no/such.yaml"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: no/such.yaml: no such config file"
