"""The run config: YAML -> frozen pydantic models; strategy, fitness and space chosen by `name:`.

Errors come out as one line naming the field path, e.g.
``config strategy.alpha: Input should be greater than or equal to 0 (got -1)``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Union

import yaml
from pydantic import Field, ValidationError, model_validator

from evomerge.fitness import FITNESSES
from evomerge.populations import STRATEGIES

from .errors import UserError
from .files import read_utf8
from .schema import BOOL_ERROR, Frozen
from .spaces import SPACES


def _union(registry: dict) -> Any:
    configs = tuple(cfg for cfg, _ in registry.values())
    member = configs[0] if len(configs) == 1 else Union[configs]  # noqa: UP007
    return Annotated[member, Field(discriminator="name")]


SpaceConfig = _union(SPACES)
StrategyConfig = _union(STRATEGIES)
FitnessConfig = _union(FITNESSES)


class EngineConfig(Frozen):
    address: str = Field("local", description="'local' starts a private Ray instance; 'auto' or "
                                              "'ray://host:port' joins an existing cluster")
    workers: int = Field(2, ge=1, description="fitness worker actors")
    batch_size: int = Field(16, ge=1, description="candidates per worker call")
    queue_depth: int = Field(2, ge=1, description="batches in flight per worker (keeps it busy "
                                                  "while the driver tells and asks)")
    cpus_per_worker: float = Field(1.0, gt=0, description="Ray CPUs reserved by each worker")
    gpus_per_worker: float = Field(0.0, ge=0, description="Ray GPUs per worker (fractions share a GPU); "
                                                          "the worker's resident model lives on its GPU")
    threads_per_worker: int | None = Field(None, ge=1, description="torch threads in each worker; "
                                                                   "default the reserved CPUs")
    deterministic: bool = Field(False, description="tell results in submission order, so a run (resumed or "
                                                   "not, with or without worker failures) is a function of "
                                                   "its config and seed; costs idle time behind stragglers")
    eval_timeout_s: float | None = Field(None, gt=0, description="an evaluation running longer fails (its worker is "
                                                                 "replaced); a batch of k gets k times this")
    max_retries: int = Field(2, ge=0, description="re-dispatches of a candidate whose evaluation raised, "
                                                  "timed out or lost its worker, before it is logged as failed")
    failure_penalty: float | None = Field(None, description="fitness told to the strategy for a failed "
                                                            "evaluation (default: the worst possible)")
    max_failure_fraction: float = Field(0.5, ge=0, le=1, description="stop the run when more than this fraction "
                                                                      "of evaluations failed (checked from 10 "
                                                                      "failures)")
    max_worker_replacements: int = Field(100, ge=0, description="stop the run when workers died or hung more "
                                                                "often than this (e.g. a worker that cannot start)")
    worker_start_timeout_s: float | None = Field(300.0, gt=0, description="a worker not ready this many seconds "
                                                 "after it was created "
                                                 "(e.g. its node is gone and no other has room) is "
                                                 "given up and the run goes on with fewer; at start, counted from the "
                                                 "first worker ready (or as long as the first took, if longer); null: "
                                                 "wait forever")
    cache_size: int = Field(1024, ge=0, description="recent results kept to serve duplicate candidates "
                                                    "(same recipe) without evaluating them again")
    checkpoint_every_s: float = Field(30.0, gt=0, description="seconds between checkpoints (the journal "
                                                             "between them keeps every evaluation)")
    checkpoint_every_evals: int | None = Field(None, ge=1, description="also checkpoint after this many evaluations")

    def gpu_share(self) -> float:
        """A worker's share of its GPU: gpus_per_worker below 1 puts several workers on one GPU."""
        return min(1.0, self.gpus_per_worker) if self.gpus_per_worker > 0 else 1.0


class BudgetConfig(Frozen):
    max_evals: int | None = Field(10_000, ge=1, description="stop after this many evaluations")
    max_seconds: float | None = Field(None, gt=0, description="stop dispatching after this many seconds of search")

    @model_validator(mode="after")
    def _some_limit(self):
        if self.max_evals is None and self.max_seconds is None:
            raise ValueError("set max_evals or max_seconds (a search needs a budget)")
        return self


class RaceConfig(Frozen):
    first: float = Field(0.25, gt=0, lt=1, description="share of a candidate's examples scored first (at least "
                                                        "min_first); the rest only if it may still rank among "
                                                        "the cohort's best the strategy uses")
    min_first: int = Field(16, ge=2, description="fewest examples in the first slice")
    confidence: float = Field(0.99, gt=0.5, lt=1, description="a candidate is stopped when, at this confidence "
                                                              "(normal bound with finite-population correction, "
                                                              "Bonferroni over the cohort's pairs), enough of "
                                                              "its cohort score higher on all its examples")


class ScoringConfig(Frozen):
    subsample: float | None = Field(None, gt=0, description="score each cohort (a generation; a batch for "
                                                            "steady-state strategies) on a subset of the search "
                                                            "examples drawn for it: a count (>= 1) or a share "
                                                            "(< 1), stratified by task; null: all examples")
    resample: bool = Field(True, description="draw a new subset per cohort; false: one subset for the whole run "
                                             "(what M2N2, which compares score vectors across its archive, needs)")
    race: RaceConfig | None = Field(None, description="racing: score a cohort's candidates on a first slice, "
                                                      "finish only those that may rank where the strategy "
                                                      "looks (strategies that declare it: CMA-ES)")
    verify_top: int = Field(4, ge=1, description="with subsets or racing: at the end of a session, the best "
                                                 "estimates (this many) are scored on every example; the best "
                                                 "of those is the run's best, reported and saved")

    @model_validator(mode="after")
    def _whole_count(self):
        if self.subsample is not None and self.subsample >= 1 and self.subsample != int(self.subsample):
            raise ValueError(f"subsample: a count must be a whole number (got {self.subsample}); a share is < 1")
        return self

    @property
    def active(self) -> bool:
        return self.subsample is not None or self.race is not None


class RunConfig(Frozen):
    seed: int = Field(0, description="seed of the strategy and of random initialisations")
    space: SpaceConfig
    strategy: StrategyConfig
    fitness: FitnessConfig
    engine: EngineConfig = EngineConfig()
    budget: BudgetConfig = BudgetConfig()
    scoring: ScoringConfig = ScoringConfig()
    progress_every_s: float = Field(5.0, gt=0, description="seconds between progress lines when not on a terminal")

    @model_validator(mode="after")
    def _fitness_fits_space(self):
        fit_cls = FITNESSES[self.fitness.name][1]
        if self.space.name not in fit_cls.spaces:
            raise ValueError(f"fitness '{self.fitness.name}' scores spaces {list(fit_cls.spaces)}, "
                             f"not space '{self.space.name}'")
        return self


# loading -------------------------------------------------------------------------------------

class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (plain YAML lets the last one win)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *defaults`: keys given next to it override it, as intended
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: SafeLoader's own error says so
                    break
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first given on line {first.line + 1})",
                        key_node.start_mark)
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str):
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader


def _yaml_problem(e: yaml.YAMLError) -> tuple[str, str]:
    """(' line N', problem) of a YAML error."""
    mark = getattr(e, "problem_mark", None)
    where = f" line {mark.line + 1}" if mark else ""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return where, problem


def parse_set(item: str) -> tuple[list[str], Any]:
    """`strategy.alpha=0.5` -> (['strategy', 'alpha'], 0.5); the value is read as YAML (a key given twice in
    it is an error; text that is not YAML is taken as a string)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {item}: expected KEY=VALUE, e.g. strategy.alpha=0.5")
    path = key.strip().split(".")
    if not all(p.strip() for p in path):
        raise UserError(f"--set {item}: empty part in the key {key.strip()!r}")
    try:
        value = _load_yaml(raw) if raw.strip() else None
    except yaml.constructor.ConstructorError as e:
        raise UserError(f"--set {item}: {_yaml_problem(e)[1]}") from None
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_sets(data: dict, sets: list[str]) -> dict:
    for item in sets:
        path, value = parse_set(item)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError(f"--set {item}: {'.'.join(path[:i + 1])} is not a section")
            node = child
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    text = read_utf8(p, "", "config file")
    try:
        data = _load_yaml(text)
    except yaml.YAMLError as e:
        where, problem = _yaml_problem(e)
        raise UserError(f"{p}:{where}: invalid YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{p}: a config must be a mapping of sections, got {type(data).__name__}")
    return data


_MISSING = object()


def _field_path(loc: tuple, data: Any, missing: bool = False) -> str:
    """Join pydantic's error location, dropping the tags it inserts: a discriminated union's
    (strategy.m2n2.alpha) and a plain union's member names (budget.max_evals.int,
    space.params.weight.Range.high). `missing`: the error is a missing field (the last item)."""
    parts, node = [], data
    for k, item in enumerate(loc):
        last = k == len(loc) - 1
        if isinstance(node, dict) and item not in node and (node.get("name") == item or not (missing and last)):
            continue  # a union tag (a missing field is the last item of its error)
        if node is not _MISSING and not isinstance(node, (dict, list)):
            continue  # past a scalar: a union member's name, not a field
        parts.append(str(item))
        if isinstance(node, dict):
            node = node.get(item, _MISSING)
        elif isinstance(node, list) and isinstance(item, int) and item < len(node):
            node = node[item]
        else:
            node = _MISSING
    return ".".join(parts)


def _is_type_mismatch(e: dict) -> bool:
    return e["type"].endswith(("_type", "_parsing")) or e["type"] in ("literal_error", "union_tag_invalid")


def _pick(errors: list[dict]) -> dict:
    """The error to report: pydantic reports a union's every member; of a value that failed as one
    member type but was of the other's shape (a number range given as {low, high}), the other's."""
    first = errors[0]
    if _is_type_mismatch(first) and len(first["loc"]) > 1:
        for e in errors[1:]:
            if tuple(e["loc"][:len(first["loc"]) - 1]) == tuple(first["loc"][:-1]) and not _is_type_mismatch(e):
                return e
    return first


def format_validation_error(err: ValidationError, data: dict) -> str:
    errors = err.errors(include_url=False)
    e = _pick(errors)
    path = _field_path(tuple(e["loc"]), data, e["type"] == "missing")
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == BOOL_ERROR:  # raised by the section, about one of its fields
        ctx = e["ctx"]
        path = f"{path}.{ctx['field']}{ctx['at']}" if path else f"{ctx['field']}{ctx['at']}"
        msg = f"Input should be {ctx['kind']}, not a boolean (got {ctx['value']!r})"
    elif e["type"] == "union_tag_invalid":
        choices = e.get("ctx", {}).get("expected_tags", "")
        msg = f"unknown name {e.get('ctx', {}).get('tag')!r}; choose one of {choices}"
    elif e["type"] == "union_tag_not_found":
        msg = "missing 'name' (which one to use)"
    elif e["type"] == "extra_forbidden":
        msg = "unknown field"
    elif e["type"] == "finite_number":
        msg = f"must be a finite number, not {e['input']!r}"
    elif e["type"] != "missing" and "input" in e and not isinstance(e["input"], dict):
        msg += f" (got {e['input']!r})"
    # other problems, each place once (a union's members failing at one place are one problem)
    here = _field_path(tuple(e["loc"]), data, e["type"] == "missing")
    places = {_field_path(tuple(x["loc"]), data, x["type"] == "missing") for x in errors if x is not e}
    n = len({q for q in places if not (q == here or q.startswith(here + ".") or here.startswith(q + "."))})
    more = f" (and {n} more)" if n else ""
    return f"config {path}: {msg}{more}" if path else f"config: {msg}{more}"


def validate(data: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise UserError(format_validation_error(err, data)) from None


def load_config(path: str | Path, sets: list[str] | None = None) -> RunConfig:
    return validate(apply_sets(read_yaml(path), sets or []))


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
