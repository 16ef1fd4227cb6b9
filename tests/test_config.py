"""Bad input: one line naming the field or file, exit code 2, no run directory."""
import pytest

from evomerge.config import load_config, to_yaml, validate
from evomerge.errors import UserError


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


GOOD = """
space: {name: digits_mlp}
strategy: {name: m2n2}
fitness: {name: digits}
"""


def test_defaults_fill_in_and_the_config_is_frozen(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.strategy.archive_size == 20 and cfg.engine.workers == 2
    with pytest.raises(Exception):
        cfg.seed = 3
    assert validate(__import__("yaml").safe_load(to_yaml(cfg))) == cfg  # resolved YAML round-trips


@pytest.mark.parametrize("sets, message", [
    (["strategy.alpha=-1"], "config strategy.alpha: Input should be greater than or equal to 0 (got -1)"),
    (["strategy.bogus=1"], "config strategy.bogus: unknown field"),
    (["strategy.name=nope"], "config strategy: unknown name 'nope'; choose one of 'm2n2', 'cmaes', 'random'"),
    (["engine.workers=two"], "config engine.workers: Input should be a valid integer"),
    (["budget.max_evals=null"], "config budget: set max_evals or max_seconds (a search needs a budget)"),
    (["strategy.popsize=10"], "config strategy.popsize: unknown field"),
    (["seed"], "--set seed: expected KEY=VALUE"),
    (["strategy.name.x=1"], "--set strategy.name.x=1: strategy.name is not a section"),
])
def test_bad_values_name_the_field(tmp_path, sets, message):
    with pytest.raises(UserError) as e:
        load_config(write(tmp_path, GOOD), sets)
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


def test_strategy_field_under_the_union_tag_is_named_plainly(tmp_path):
    with pytest.raises(UserError, match=r"^config strategy.sigma0: Input should be greater than 0"):
        load_config(write(tmp_path, GOOD), ["strategy.name=cmaes", "strategy.sigma0=0"])


@pytest.mark.parametrize("text, message", [
    ("space: [1, 2", "invalid YAML"),
    ("- 1\n- 2\n", "a config must be a mapping"),
    ("strategy: {name: m2n2}\nfitness: {name: digits}\n", "config space: Field required"),
    ("space: {name: digits_mlp}\nstrategy: {}\nfitness: {name: digits}\n", "config strategy: missing 'name'"),
])
def test_bad_files(tmp_path, text, message):
    with pytest.raises(UserError, match=message):
        load_config(write(tmp_path, text))


def test_cli_config_error_exits_2_with_one_line_and_no_run_dir(cli, tmp_path):
    out = tmp_path / "run"
    r = cli("--config", "configs/quickstart.yaml", "--set", "strategy.alpha=-1", "--out", str(out))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: config strategy.alpha: Input should be greater than or equal to 0 (got -1)"]
    assert "Traceback" not in r.stderr and not out.exists()


def test_cli_missing_file_and_used_out_dir(cli, tmp_path):
    r = cli("--config", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and r.stderr.strip() == f"error: {tmp_path / 'nope.yaml'}: no such config file"
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "evals.jsonl").write_text("{}\n")
    r = cli("--config", "configs/quickstart.yaml", "--out", str(tmp_path / "used"))
    assert r.returncode == 2 and "already exists" in r.stderr
    assert (tmp_path / "used" / "evals.jsonl").read_text() == "{}\n"  # nothing lost
