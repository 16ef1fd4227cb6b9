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


# numbers are numbers, keys are unique, files are UTF-8 ------------------------------------------

def _models():
    """Every config section reachable from RunConfig: registries (spaces, strategies, fitnesses) and
    nested sections (Range, Models, TaskSpec, ...)."""
    import typing

    from pydantic import BaseModel

    from evomerge.config import RunConfig

    seen = []

    def walk(tp):
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if tp not in seen:
                seen.append(tp)
                for f in tp.model_fields.values():
                    walk(f.annotation)
        for a in typing.get_args(tp):
            walk(a)

    walk(RunConfig)
    return seen


def _bad(tp, leaf: type, value):
    """An input for a field of type `tp` that puts `value` where a `leaf` (int or float) goes; None if
    the type holds no such leaf outside nested sections."""
    import types
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is leaf:
        return value
    if origin is typing.Annotated:
        return _bad(args[0], leaf, value)
    if origin in (typing.Union, types.UnionType):
        if leaf is int and any(a in (bool, float) for a in args):
            return None  # int | float (a float then) or a boolean is allowed: not this check's case
        if isinstance(value, bool) and bool in args:
            return None  # a union that takes booleans (e.g. space.options): a boolean is allowed
        return next((b for a in args if (b := _bad(a, leaf, value)) is not None), None)
    if origin in (list, set, frozenset) or origin is tuple and args[-1:] == (Ellipsis,):
        b = _bad(args[0], leaf, value)
        return None if b is None else [b]
    if origin is tuple:
        items = [_bad(a, leaf, value) for a in args]
        k = next((i for i, b in enumerate(items) if b is not None), None)
        return None if k is None else [0.5] * k + [items[k]] + [0.5] * (len(args) - k - 1)
    if origin is dict:
        b = _bad(args[1], leaf, value)
        return None if b is None else {"k": b}
    return None


def _tag(model) -> dict:
    import typing

    f = model.model_fields.get("name")
    if f is not None and typing.get_origin(f.annotation) is typing.Literal:
        return {"name": typing.get_args(f.annotation)[0]}
    return {}


def _field_cases(leaf: type, value):
    return [(m, name, bad) for m in _models() for name, f in m.model_fields.items()
            if (bad := _bad(f.annotation, leaf, value)) is not None]


def test_every_float_field_of_every_section_refuses_inf_and_nan():
    from pydantic import ValidationError

    cases = _field_cases(float, float("inf"))
    fields = {f"{m.__name__}.{n}" for m, n, _ in cases}
    # the walk reaches registries and nested sections, and floats inside unions, tuples and dicts
    assert {"EngineConfig.failure_penalty", "CMAESConfig.sigma0", "CMAESConfig.bounds", "Range.low",
            "HFMergeSpaceConfig.params", "TaskSpec.weight", "LMEvalTask.limit", "M2N2Config.mutation_std",
            "SyntheticFitnessConfig.fail_rate", "BudgetConfig.max_seconds"} <= fields
    for bad in (float("inf"), float("-inf"), float("nan")):
        for model, name, value in _field_cases(float, bad):
            with pytest.raises(ValidationError) as e:
                model.model_validate({**_tag(model), name: value})
            assert any(x["type"] == "finite_number" and x["loc"][0] == name for x in e.value.errors()), (model, name)


def test_every_int_field_of_every_section_refuses_a_boolean():
    from pydantic import ValidationError

    from evomerge.schema import BOOL_ERROR

    cases = _field_cases(int, True)
    fields = {f"{m.__name__}.{n}" for m, n, _ in cases}
    assert {"RunConfig.seed", "BudgetConfig.max_evals", "EngineConfig.workers", "TaskSpec.limit",
            "CMAESConfig.popsize", "HFMergeSpaceConfig.layer_granularity", "LMEvalFitnessConfig.batch_size"} <= fields
    for model, name, value in cases + _field_cases(float, False):
        with pytest.raises(ValidationError) as e:
            model.model_validate({**_tag(model), name: value})
        errs = e.value.errors()
        assert errs[0]["type"] == BOOL_ERROR and errs[0]["ctx"]["field"] == name, (model, name, errs)


@pytest.mark.parametrize("sets, message", [
    (["budget.max_evals=true"], "config budget.max_evals: Input should be an integer, not a boolean (got True)"),
    (["seed=false"], "config seed: Input should be an integer, not a boolean (got False)"),
    (["engine.cpus_per_worker=true"], "config engine.cpus_per_worker: Input should be a number, not a boolean"),
    (["strategy.mutation_std=true"], "config strategy.mutation_std: Input should be a number, not a boolean"),
    (["strategy.name=cmaes", "strategy.bounds=[0, true]"],
     "config strategy.bounds.1: Input should be a number, not a boolean (got True)"),
    (["strategy.alpha=.inf"], "config strategy.alpha: must be a finite number, not inf"),
    (["strategy.alpha=-.inf"], "config strategy.alpha: must be a finite number, not -inf"),
    (["engine.failure_penalty=.nan"], "config engine.failure_penalty: must be a finite number, not nan"),
    (["budget.max_seconds=.inf"], "config budget.max_seconds: must be a finite number, not inf"),
    (["strategy.name=cmaes", "strategy.sigma0=.inf"], "config strategy.sigma0: must be a finite number, not inf"),
    (["strategy.name=cmaes", "strategy.bounds=[0, .inf]"], "config strategy.bounds.1: must be a finite number"),
    (["progress_every_s=inf"], "config progress_every_s: must be a finite number, not 'inf'"),
    (["strategy={name: m2n2, name: cmaes}"], "--set strategy={name: m2n2, name: cmaes}: duplicate key 'name'"),
    (["strategy..alpha=1"], "--set strategy..alpha=1: empty part in the key"),
])
def test_numbers_and_set_values(tmp_path, sets, message):
    with pytest.raises(UserError) as e:
        load_config(write(tmp_path, GOOD), sets)
    assert str(e.value).startswith(message), str(e.value)


def test_numbers_given_as_other_numbers_are_still_accepted(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), ["strategy.alpha=1", "engine.cpus_per_worker=2", "budget.max_seconds=5",
                                              "strategy.splitpoint=false", "engine.workers=2.0"])
    assert cfg.strategy.alpha == 1.0 and isinstance(cfg.strategy.alpha, float)
    assert cfg.engine.cpus_per_worker == 2.0 and cfg.budget.max_seconds == 5.0 and cfg.engine.workers == 2
    assert cfg.strategy.splitpoint is False  # a boolean field takes booleans
    cfg = load_config(write(tmp_path, GOOD), ["strategy.name=cmaes", "strategy.bounds=[-1, 2]"])
    assert cfg.strategy.bounds == (-1.0, 2.0)


def test_a_union_failure_names_the_member_the_value_was_meant_for():
    from evomerge.config import validate

    data = {"space": {"name": "hf_merge", "models": {"base": "b", "experts": {"a": "x"}},
                      "params": {"weight": {"low": 0, "high": float("inf")}}},
            "strategy": {"name": "random"}, "fitness": {"name": "lm_tasks", "tasks": [
                {"name": "t", "path": "t.jsonl", "kind": "generate"}]}}
    with pytest.raises(UserError) as e:
        validate(data)
    assert str(e.value) == "config space.params.weight.high: must be a finite number, not inf"


@pytest.mark.parametrize("text, message", [
    ("space: {name: digits_mlp}\nstrategy: {name: m2n2}\nfitness: {name: digits}\nstrategy: {name: cmaes}\n",
     "line 4: invalid YAML: duplicate key 'strategy' (first given on line 2)"),
    ("space: {name: digits_mlp}\nstrategy:\n  name: m2n2\n  alpha: 1\n  alpha: 2\nfitness: {name: digits}\n",
     "line 5: invalid YAML: duplicate key 'alpha' (first given on line 4)"),
    ("space:\n  name: hf_merge\n  models:\n    base: b\n    experts: {a: x, a: y}\n",
     "line 5: invalid YAML: duplicate key 'a' (first given on line 5)"),
])
def test_duplicate_keys_at_any_depth(tmp_path, text, message):
    with pytest.raises(UserError) as e:
        load_config(write(tmp_path, text))
    assert str(e.value).startswith(f"{tmp_path / 'c.yaml'}: {message}")
    assert "\n" not in str(e.value)


def test_a_merge_key_may_be_overridden_and_a_bom_is_fine(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("space: &s {name: digits_mlp}\nstrategy: {name: m2n2}\nfitness: {name: digits}\n"
                 "engine: {<<: {workers: 3, batch_size: 4}, workers: 5}\n")
    cfg = load_config(p)
    assert cfg.engine.workers == 5 and cfg.engine.batch_size == 4
    p.write_bytes(b"\xef\xbb\xbf" + GOOD.encode())
    assert load_config(p).strategy.name == "m2n2"


def test_a_config_that_is_not_utf8_is_one_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes(("# caf\u00e9\n" + GOOD).encode("latin-1"))
    with pytest.raises(UserError) as e:
        load_config(p)
    assert str(e.value) == f"{p}: line 1: not UTF-8 text (byte 0xe9); save the config file as UTF-8"
    with pytest.raises(UserError, match="is a directory, not a config file"):
        load_config(tmp_path)
