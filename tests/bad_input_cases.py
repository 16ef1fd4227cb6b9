"""The bad-input corpus: user mistakes that must be refused as ONE line ``error: ...`` with exit code 2,
before any Ray worker starts, leaving no run directory.

Run by tests/test_bad_input.py (in-process through ``evomerge.cli.main``, plus a few real subprocesses)
and by bench/bad_input.py (every case as a real subprocess, timed).

Add a case: append a ``Case`` to ``CASES`` (or a list that is added to it at the bottom)::

    Case("my-id", ["--config", QUICKSTART, "--set", "budget.max_evals=0"],
         "config budget.max_evals: Input should be greater than or equal to 1")

* ``argv``: the command's arguments, or a callable ``argv(env) -> list[str]`` that writes what the case
  needs under ``env.tmp`` first (``env.write(name, text_or_bytes)``, ``env.family()`` for a tiny HF
  model family shared by all cases). In a list, ``{tmp}``, ``{out}`` and ``{root}`` are replaced.
* ``expect``: a piece of the error line (after ``error: ``), with the same replacements.
* ``--out {out}`` is appended unless ``out=False``; ``{out}`` must not exist after the command. A case
  whose ``--out`` (or ``--resume``) directory exists beforehand sets ``keeps_dir`` to that path
  (``"{out}"`` or another): its files must be byte for byte the same afterwards.
* ``needs``: optional packages ('lm_eval'); the case is skipped without them.
* ``group``: what the case is about ('config', 'task_file', ...); the bench reports its figure over
  the 'task_file' group.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = "configs/quickstart.yaml"

Argv = Union[list, Callable[["Env"], list]]


@dataclass(frozen=True)
class Case:
    id: str
    argv: Argv
    expect: str
    out: bool = True
    keeps_dir: str | None = None
    needs: tuple[str, ...] = ()
    group: str = "config"


class Shared:
    """What cases share, built on first use under `root` (kept for a test module or a bench run)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._family = None

    def finished_run(self) -> Path:
        """A finished 200-evaluation synthetic run (the real command), for the resume cases to copy."""
        run = self.root / "finished"
        if not (run / "summary.json").exists():
            import subprocess
            import sys

            cfg = self.root / "finished.yaml"
            cfg.write_text(yaml.safe_dump({
                "space": {"name": "synthetic", "dim": 4}, "strategy": {"name": "random"},
                "fitness": {"name": "synthetic"}, "engine": {"workers": 1, "cpus_per_worker": 0.5},
                "budget": {"max_evals": 200}}))
            subprocess.run([sys.executable, "run.py", "--config", str(cfg), "--out", str(run), "--no-progress"],
                           cwd=ROOT, check=True, capture_output=True, timeout=300)
        return run

    def family(self) -> tuple[str, dict[str, str]]:
        """(base, {label: expert}) directories of a tiny random Llama family (tests/hf_models.py)."""
        if self._family is None:
            from transformers.utils import logging as hf_logging

            from hf_models import tiny_family

            hf_logging.disable_progress_bar()
            base, experts = tiny_family(self.root / "family", experts=("a", "b"))
            self._family = str(base), {k: str(v) for k, v in experts.items()}
        return self._family


class Env:
    """One case's surroundings: its own directory `tmp` (given resolved), the `out` path it must not
    create, and the shared resources."""

    def __init__(self, shared: Shared, tmp: Path):
        self.shared = shared
        self.tmp = Path(tmp).resolve()
        self.out = self.tmp / "run"

    def sub(self, s: str) -> str:
        return s.replace("{tmp}", str(self.tmp)).replace("{out}", str(self.out)).replace("{root}", str(ROOT))

    def write(self, name: str, data: str | bytes) -> str:
        p = self.tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            p.write_bytes(data)
        else:
            p.write_text(data)
        return str(p)

    def config(self, cfg: dict, name: str = "c.yaml") -> str:
        return self.write(name, yaml.safe_dump(cfg, sort_keys=False))

    def family(self) -> tuple[str, dict[str, str]]:
        return self.shared.family()

    def old_run(self) -> Path:
        """A copy of the shared finished run, at {tmp}/old."""
        import shutil

        dst = self.tmp / "old"
        shutil.copytree(self.shared.finished_run(), dst)
        return dst

    def argv(self, case: Case) -> list[str]:
        args = case.argv(self) if callable(case.argv) else [self.sub(a) for a in case.argv]
        return [*args, "--out", str(self.out)] if case.out else list(args)

    def expect(self, case: Case) -> str:
        return self.sub(case.expect)

    def kept(self, case: Case) -> Path | None:
        return Path(self.sub(case.keeps_dir)) if case.keeps_dir else None


def snapshot(path: Path | None) -> dict | None:
    """{relative path: bytes} of every file under `path` but a run directory's .lock (None: no such
    directory)."""
    if path is None or not path.exists():
        return None
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != ".lock"}  # the lock names the last process that held it


def problems(case: Case, env: Env, rc: int, stderr: str, before: dict | None) -> list[str]:
    """What is wrong with a refusal (empty: the case passes). `before`: snapshot(env.kept(case)) taken
    before the command."""
    bad = []
    if rc != 2:
        bad.append(f"exit code {rc}, not 2")
    lines = stderr.splitlines()
    if "Traceback" in stderr:
        bad.append("a traceback on stderr")
    if len(lines) != 1:
        bad.append(f"{len(lines)} lines on stderr, not 1: {stderr[-600:]!r}")
    elif not lines[0].startswith("error: "):
        bad.append(f"the line does not start with 'error: ': {lines[0]!r}")
    elif env.expect(case) not in lines[0]:
        bad.append(f"expected {env.expect(case)!r} in {lines[0]!r}")
    kept = env.kept(case)
    if env.out.exists() and (kept is None or kept.resolve() != env.out.resolve()):
        bad.append(f"{env.out} exists afterwards")
    if kept is not None and snapshot(kept) != before:
        bad.append(f"{kept} changed")
    return bad


# configs ---------------------------------------------------------------------------------------

DIGITS = {"space": {"name": "digits_mlp"}, "strategy": {"name": "m2n2"}, "fitness": {"name": "digits"}}


def _file(name: str, data: str | bytes, *sets: str) -> Callable[[Env], list]:
    """A config file with this text (or bytes), then --set items."""
    def argv(env: Env) -> list:
        args = ["--config", env.write(name, data)]
        for s in sets:
            args += ["--set", s]
        return args
    return argv


def _digits(*sets: str, **sections) -> Callable[[Env], list]:
    """A minimal digits config (sections replaced by keyword), then --set items."""
    return _file("c.yaml", yaml.safe_dump({**DIGITS, **sections}, sort_keys=False), *sets)


def _sets(*sets: str) -> list:
    return ["--config", QUICKSTART, *[a for s in sets for a in ("--set", s)]]


def _hf_config(env: Env, fitness: dict, **space) -> str:
    """An hf_merge space over the shared tiny family (or the given models), a random search."""
    base, experts = env.family() if "models" not in space else (None, None)
    return env.config({
        "space": {"name": "hf_merge", "method": "task_arithmetic", "layer_granularity": 0,
                  "cache_dir": str(env.tmp / "tv"), "models": {"base": base, "experts": experts}, **space},
        "strategy": {"name": "random"}, "fitness": fitness, "engine": {"workers": 1}, "budget": {"max_evals": 4}})


def _fake_hf(fitness: dict | None = None, **space) -> Callable[[Env], list]:
    """An hf_merge config whose models are never opened (refused while validating)."""
    def argv(env: Env) -> list:
        fit = fitness or {"name": "lm_tasks", "tasks": [{"name": "t", "path": "t.jsonl", "kind": "generate"}]}
        return ["--config", _hf_config(env, fit, models={"base": "/nonexistent/base",
                                                         "experts": {"a": "/nonexistent/a"}}, **space)]
    return argv


LATIN1_CONFIG = "# caf\u00e9 au lait\nspace: {name: digits_mlp}\nstrategy: {name: m2n2}\nfitness: {name: digits}\n"

CONFIG_CASES = [
    # the file
    Case("config-missing", ["--config", "{tmp}/nope.yaml"], "{tmp}/nope.yaml: no such config file"),
    Case("config-is-a-directory", ["--config", "{tmp}"], "{tmp}: is a directory, not a config file"),
    Case("config-is-a-list", _file("c.yaml", "- 1\n- 2\n"), "a config must be a mapping of sections, got list"),
    Case("config-is-a-string", _file("c.yaml", "hello\n"), "a config must be a mapping of sections, got str"),
    Case("config-empty", _file("c.yaml", ""), "config space: Field required"),
    Case("config-invalid-yaml", _file("c.yaml", "space: [1, 2\n"), "invalid YAML"),
    Case("config-latin1", _file("c.yaml", LATIN1_CONFIG.encode("latin-1")),
         "c.yaml: line 1: not UTF-8 text (byte 0xe9)"),
    Case("config-duplicate-section", _file("c.yaml", "space: {name: digits_mlp}\nstrategy: {name: m2n2}\n"
                                                     "fitness: {name: digits}\nstrategy: {name: cmaes}\n"),
         "c.yaml: line 4: invalid YAML: duplicate key 'strategy' (first given on line 2)"),
    Case("config-duplicate-nested-key", _file("c.yaml", "space: {name: digits_mlp}\nstrategy:\n  name: m2n2\n"
                                                        "  alpha: 1\n  alpha: 2\nfitness: {name: digits}\n"),
         "c.yaml: line 5: invalid YAML: duplicate key 'alpha' (first given on line 4)"),
    Case("config-duplicate-key-deep", _file("c.yaml", "space:\n  name: hf_merge\n  models:\n    base: b\n"
                                                      "    experts: {a: x, a: y}\nstrategy: {name: m2n2}\n"
                                                      "fitness: {name: digits}\n"),
         "c.yaml: line 5: invalid YAML: duplicate key 'a'"),
    Case("no-config", [], "give --config YAML (a new run) or --resume RUN_DIR"),
    # --set
    Case("set-duplicate-key", _sets("strategy={name: m2n2, name: cmaes}"),
         "--set strategy={name: m2n2, name: cmaes}: duplicate key 'name'"),
    Case("set-no-equals", _sets("seed"), "--set seed: expected KEY=VALUE"),
    Case("set-empty-key", _sets("=1"), "--set =1: expected KEY=VALUE"),
    Case("set-empty-key-part", _sets("strategy..alpha=1"), "--set strategy..alpha=1: empty part in the key"),
    Case("set-into-a-value", _sets("strategy.name.x=1"), "--set strategy.name.x=1: strategy.name is not a section"),
    # fields
    Case("unknown-section", _sets("bogus=1"), "config bogus: unknown field"),
    Case("unknown-field", _sets("strategy.bogus=1"), "config strategy.bogus: unknown field"),
    Case("unknown-field-of-another-strategy", _sets("strategy.popsize=10"), "config strategy.popsize: unknown field"),
    Case("unknown-strategy", _sets("strategy.name=nope"), "config strategy: unknown name 'nope'; choose one of"),
    Case("missing-name", _digits(strategy={}), "config strategy: missing 'name'"),
    Case("section-not-a-mapping", _sets("engine=5"), "config engine: Input should be a valid dictionary"),
    Case("wrong-type-int", _sets("engine.workers=two"), "config engine.workers: Input should be a valid integer"),
    Case("fractional-int", _sets("engine.workers=2.5"), "config engine.workers: Input should be a valid integer"),
    Case("out-of-range", _sets("strategy.alpha=-1"),
         "config strategy.alpha: Input should be greater than or equal to 0"),
    Case("no-budget", _sets("budget.max_evals=null"), "config budget: set max_evals or max_seconds"),
    Case("fitness-does-not-score-the-space", _sets("fitness={name: synthetic}"),
         "fitness 'synthetic' scores spaces"),
    # booleans where numbers are expected (pydantic alone reads true as 1)
    Case("bool-max-evals", _sets("budget.max_evals=true"),
         "config budget.max_evals: Input should be an integer, not a boolean (got True)"),
    Case("bool-workers", _sets("engine.workers=false"),
         "config engine.workers: Input should be an integer, not a boolean (got False)"),
    Case("bool-seed", _sets("seed=true"), "config seed: Input should be an integer, not a boolean (got True)"),
    Case("bool-optional-int", _sets("engine.checkpoint_every_evals=true"),
         "config engine.checkpoint_every_evals: Input should be an integer, not a boolean"),
    Case("bool-float", _sets("engine.cpus_per_worker=true"),
         "config engine.cpus_per_worker: Input should be a number, not a boolean (got True)"),
    Case("bool-in-a-file", _digits(budget={"max_evals": True}),
         "config budget.max_evals: Input should be an integer, not a boolean (got True)"),
    Case("bool-in-a-tuple", _digits(strategy={"name": "cmaes", "bounds": [0, True]}),
         "config strategy.bounds.1: Input should be a number, not a boolean (got True)"),
    Case("bool-task-limit", _fake_hf({"name": "lm_tasks", "tasks": [
        {"name": "t", "path": "t.jsonl", "kind": "generate", "limit": True}]}),
         "config fitness.tasks.0.limit: Input should be an integer, not a boolean (got True)"),
    # .inf / .nan in floats
    Case("inf-sigma0", _digits(strategy={"name": "cmaes", "sigma0": float("inf")}),
         "config strategy.sigma0: must be a finite number, not inf"),
    Case("inf-sigma0-set", _digits("strategy.sigma0=.inf", strategy={"name": "cmaes"}),
         "config strategy.sigma0: must be a finite number, not inf"),
    Case("neg-inf-alpha", _sets("strategy.alpha=-.inf"), "config strategy.alpha: must be a finite number, not -inf"),
    Case("nan-failure-penalty", _sets("engine.failure_penalty=.nan"),
         "config engine.failure_penalty: must be a finite number, not nan"),
    Case("inf-max-seconds", _sets("budget.max_seconds=.inf"),
         "config budget.max_seconds: must be a finite number, not inf"),
    Case("inf-as-a-string", _sets("progress_every_s=inf"),
         "config progress_every_s: must be a finite number, not 'inf'"),
    Case("inf-in-a-tuple", _digits(strategy={"name": "cmaes", "bounds": [0, float("inf")]}),
         "config strategy.bounds.1: must be a finite number, not inf"),
    Case("method-option-unknown", _fake_hf(method="della", options={"foo": 1}),
         "options.foo: method della takes rescale"),
    Case("method-option-type", _fake_hf(method="della", options={"rescale": 2}), "options.rescale: a bool"),
    Case("method-expert-count", _fake_hf(method="nuslerp"), "method nuslerp merges exactly 2 expert(s), got 1"),
    Case("method-nothing-to-search", lambda env: ["--config", _hf_config(env, {"name": "lm_tasks", "tasks": [
        {"name": "t", "path": env.write("t.jsonl", '{"prompt": "a", "answer": "b", "split": "train"}\n'),
         "kind": "generate"}]},
        method="karcher")], "space.method: karcher has no parameter to search"),
    Case("layers-scale-range-zero", lambda env: ["--config", env.config({
        "space": {"name": "hf_layers", "scales": True, "scale_range": {"low": 0.0, "high": 1.0},
                  "models": {"base": "/nonexistent/base", "experts": {"a": "/nonexistent/a"}}},
        "strategy": {"name": "random"}, "fitness": {"name": "lm_tasks", "tasks": [
            {"name": "t", "path": "t.jsonl", "kind": "generate"}]}, "budget": {"max_evals": 4}})],
        "scale_range.low: 0: a scale must be above 0"),
    Case("inf-in-a-dict", _fake_hf(params={"weight": float("inf")}),
         "config space.params.weight: must be a finite number, not inf"),
    Case("inf-in-a-range", _fake_hf(params={"weight": {"low": 0, "high": float("inf")}}),
         "config space.params.weight.high: must be a finite number, not inf"),
    Case("nan-task-weight", _fake_hf({"name": "lm_tasks", "tasks": [
        {"name": "t", "path": "t.jsonl", "kind": "generate", "weight": float("nan")}]}),
         "config fitness.tasks.0.weight: must be a finite number, not nan"),
]


# task files ------------------------------------------------------------------------------------

GEN_ROWS = [{"prompt": "ab=", "answer": "ba"}, {"prompt": "cd=", "answer": "dc"}]
MC_ROWS = [{"prompt": "1+1=", "choices": ["2", "3"], "answer": 0},
           {"prompt": "2+2=", "choices": ["4", "5"], "answer": 0}]


@dataclass(frozen=True)
class Defect:
    """A defective JSONL task file: made from the good rows (two lines; a bad row is line 3)."""

    id: str
    kind: str  # 'generate' | 'choice'
    make: Callable[[Callable[[dict], bytes], list[dict]], bytes | None]  # (row -> line, good rows) -> bytes
    expect: str | dict  # the error after the file's path; or {flavor: that}
    flavors: tuple[str, ...] = ("lm_tasks", "api", "lm_eval")


MISSING, DIRECTORY = None, b"<directory>"


def _lines(line, rows):
    return b"".join(line(r) for r in rows)


def _plus(row: dict | bytes):
    return lambda line, rows: _lines(line, rows) + (row if isinstance(row, bytes) else line(row))


DEFECTS = [
    Defect("missing-file", "generate", lambda line, rows: MISSING, ": no such JSONL file"),
    Defect("directory", "generate", lambda line, rows: DIRECTORY, ": is a directory, not a JSONL file",
           ("lm_tasks", "api")),
    Defect("empty-file", "choice", lambda line, rows: b"", ": empty file"),
    Defect("blank-lines-only", "choice", lambda line, rows: b"\n  \n\n", ": empty file", ("lm_tasks", "api")),
    Defect("bad-json", "choice", _plus(b'{"prompt": "x", \n'), " line 3: invalid JSON"),
    Defect("non-object", "choice", _plus(b"[1, 2]\n"), " line 3: expected a JSON object, got an array"),
    Defect("latin1", "choice",
           _plus('{"prompt": "caf\u00e9=", "choices": ["a", "b"], "answer": 0}\n'.encode("latin-1")),
           ": line 3: not UTF-8 text (byte 0xe9)"),
    Defect("bom", "choice", lambda line, rows: b"\xef\xbb\xbf" + _lines(line, rows),
           ": starts with a UTF-8 byte-order mark (BOM)"),
    Defect("missing-answer", "generate", _plus({"prompt": "ef="}), " line 3: missing 'answer'", ("lm_tasks", "api")),
    Defect("missing-answer-choice", "choice", _plus({"prompt": "3+3=", "choices": ["6", "7"]}),
           " line 3: missing 'answer'"),
    Defect("missing-prompt", "choice", _plus({"choices": ["6", "7"], "answer": 0}), " line 3: missing 'prompt'"),
    Defect("missing-split", "generate", lambda line, rows: _lines(line, rows) + b'{"prompt": "ef=", "answer": "fe"}\n',
           " line 3: missing 'split'", ("lm_tasks", "api")),
    Defect("bad-split", "generate", _plus({"prompt": "ef=", "answer": "fe", "split": "dev"}),
           " line 3: 'split' must be 'train' or 'test' (got 'dev')", ("lm_tasks", "api")),
    Defect("only-test-split", "generate", lambda line, rows: b"".join(line({**r, "split": "test"}) for r in rows),
           ': no examples with "split": "train"', ("lm_tasks", "api")),
    Defect("prompt-not-a-string", "generate", _plus({"prompt": 5, "answer": "5"}),
           " line 3: 'prompt' must be a string, not a number", ("lm_tasks", "api")),
    Defect("empty-prompt", "choice", _plus({"prompt": "", "choices": ["6", "7"], "answer": 0}),
           " line 3: 'prompt' is empty"),
    Defect("whitespace-prompt", "choice", _plus({"prompt": " \t ", "choices": ["6", "7"], "answer": 0}),
           " line 3: 'prompt' is empty"),
    Defect("answer-a-boolean", "generate", _plus({"prompt": "ef=", "answer": True}),
           " line 3: 'answer' must be a string or a number, not a boolean", ("lm_tasks", "api")),
    Defect("answer-out-of-range", "choice", _plus({"prompt": "3+3=", "choices": ["6", "7"], "answer": 2}),
           " line 3: 'answer' must be the index of the right choice, 0..1 (got 2)"),
    Defect("answer-negative", "choice", _plus({"prompt": "3+3=", "choices": ["6", "7"], "answer": -1}),
           " line 3: 'answer' must be the index of the right choice, 0..1 (got -1)", ("lm_tasks", "api")),
    Defect("answer-index-a-boolean", "choice", _plus({"prompt": "3+3=", "choices": ["6", "7"], "answer": True}),
           {"lm_eval": " line 3: 'answer' is a boolean (got True)",
            None: " line 3: 'answer' must be the index of the right choice, 0..1 (got True)"}),
    Defect("empty-choice", "choice", _plus({"prompt": "3+3=", "choices": ["6", ""], "answer": 0}),
           " line 3: 'choices' must be a list of"),
    Defect("missing-choices", "choice", _plus({"prompt": "3+3=", "answer": 0}),
           {"lm_eval": " line 3: 'choices' must be a list of non-empty strings (got None)",
            None: " line 3: missing 'choices'"}),
    Defect("one-choice", "choice", _plus({"prompt": "3+3=", "choices": ["6"], "answer": 0}),
           " line 3: 'choices' must be a list of at least 2 non-empty strings", ("lm_tasks", "api")),
]


def _write_defect(env: Env, d: Defect, name: str, with_split: bool) -> str:
    def line(r: dict) -> bytes:
        return (json.dumps({**r, "split": "train"} if with_split and "split" not in r else r) + "\n").encode()

    rows = GEN_ROWS if d.kind == "generate" else MC_ROWS
    data = d.make(line, rows)
    p = env.tmp / name
    p.parent.mkdir(parents=True, exist_ok=True)
    if data is DIRECTORY:
        p.mkdir()
    elif data is not MISSING:
        p.write_bytes(data)
    return str(p)


def _expect(d: Defect, flavor: str) -> str:
    return d.expect.get(flavor, d.expect.get(None)) if isinstance(d.expect, dict) else d.expect


def _lm_tasks_case(d: Defect) -> Case:
    def argv(env: Env) -> list:
        path = _write_defect(env, d, "t.jsonl", with_split=True)
        fit = {"name": "lm_tasks", "tasks": [{"name": "t", "path": path, "kind": d.kind}]}
        return ["--config", _hf_config(env, fit)]
    return Case(f"lm_tasks-{d.id}", argv, "fitness.tasks[0].path: {tmp}/t.jsonl" + _expect(d, "lm_tasks"),
                group="task_file")


def _api_case(d: Defect) -> Case:
    """No server: the task file is refused before the reachability check (which would name base_url)."""
    def argv(env: Env) -> list:
        good = _write_defect(env, Defect("good", "generate", _lines, ""), "good.jsonl", with_split=True)
        path = _write_defect(env, d, "t.jsonl", with_split=True)
        return ["--config", env.config({
            "space": {"name": "api_weights", "models": ["a", "b"]}, "strategy": {"name": "random"},
            "fitness": {"name": "api", "base_url": "http://127.0.0.1:9/v1", "timeout_s": 1,
                        "tasks": [{"name": "good", "path": good, "kind": "generate"},
                                  {"name": "t", "path": path, "kind": d.kind}]},
            "engine": {"workers": 1}, "budget": {"max_evals": 4}})]
    return Case(f"api-{d.id}", argv, "fitness.tasks[1].path: {tmp}/t.jsonl" + _expect(d, "api"), group="task_file")


def _lm_eval_case(d: Defect) -> Case:
    """A task of our own in include_path over local JSONL (as `run.py zoo tinylm` writes them); the
    searched split's file is the defective one."""
    def argv(env: Env) -> list:
        inc = env.tmp / "tasks"
        path = _write_defect(env, d, "tasks/data/v.jsonl", with_split=False)
        test = env.write("tasks/data/t.jsonl", "".join(json.dumps(r) + "\n" for r in MC_ROWS))
        env.write("tasks/bad_mc.yaml", yaml.safe_dump({
            "task": "bad_mc", "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"validation": path, "test": test}},
            "validation_split": "validation", "test_split": "test", "output_type": "multiple_choice",
            "doc_to_text": "prompt", "doc_to_target": "answer", "doc_to_choice": "choices",
            "target_delimiter": "", "metric_list": [{"metric": "acc", "aggregation": "mean",
                                                     "higher_is_better": True}]}, sort_keys=False))
        fit = {"name": "lm_eval", "include_path": str(inc), "tasks": [{"name": "bad_mc"}]}
        return ["--config", _hf_config(env, fit)]
    return Case(f"lm_eval-{d.id}", argv,
                "fitness.tasks[0].name: task 'bad_mc': {tmp}/tasks/data/v.jsonl" + _expect(d, "lm_eval"),
                needs=("lm_eval",), group="task_file")


TASK_FILE_CASES = [
    *[_lm_tasks_case(d) for d in DEFECTS if "lm_tasks" in d.flavors],
    *[_api_case(d) for d in DEFECTS if "api" in d.flavors],
    *[_lm_eval_case(d) for d in DEFECTS if "lm_eval" in d.flavors and d.kind == "choice"
      or d.id == "missing-file"],
]

# run directories: --out that cannot be used, resume of a damaged one ------------------------------

def _resume(damage: Callable[[Path], None], *more: str) -> Callable[[Env], list]:
    def argv(env: Env) -> list:
        run = env.old_run()
        damage(run)
        return ["--resume", str(run), *more]
    return argv


def _rewrite(name: str, change: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        (run / name).write_bytes(change((run / name).read_bytes()))
    return damage


def _remove(name: str) -> Callable[[Path], None]:
    return lambda run: (run / name).unlink()


def _insert_garbage(data: bytes) -> bytes:
    lines = data.splitlines(keepends=True)
    return b"".join([*lines[:len(lines) // 2], b'{"id": "garbage"\n', *lines[len(lines) // 2:]])


def _out_in_a_file(env: Env) -> list:
    env.write("afile", "x")
    return [*_sets()[:2], "--out", str(env.tmp / "afile" / "run")]


def _out_not_empty(env: Env) -> list:
    env.write("run/notes.txt", "mine")
    return _sets()[:2]


def _serve(port: str) -> Callable[[Env], list]:
    def argv(env: Env) -> list:
        return ["serve", "--config", _hf_config(env, {"name": "lm_tasks", "tasks": [
            {"name": "t", "path": env.write("t.jsonl", json.dumps({"prompt": "a", "answer": "b", "split": "train"})),
             "kind": "generate"}]}), "--port", port]
    return argv


def _serve_busy(env: Env) -> list:
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    env.held = sock  # kept open while the case runs
    return _serve(str(sock.getsockname()[1]))(env)


KEEP = "{tmp}/old"
RUN_DIR_CASES = [
    Case("out-inside-a-file", _out_in_a_file, "cannot create it: Not a directory", out=False, group="run_dir"),
    Case("out-not-empty", _out_not_empty, "already exists and is not empty", keeps_dir="{out}", group="run_dir"),
    Case("out-read-only-fs", [*_sets()[:2], "--out", "/sys/evomerge-bad-input-run"],
         "--out /sys/evomerge-bad-input-run", out=False, group="run_dir"),
    Case("resume-not-a-run", ["--resume", "{tmp}"], "not a run directory with a checkpoint", out=False,
         group="run_dir"),
    Case("resume-garbage-checkpoint", _resume(_rewrite("checkpoint.pkl", lambda b: b"\x00garbage" * 9)),
         "checkpoint.pkl is damaged", out=False, keeps_dir=KEEP, group="run_dir"),
    Case("resume-truncated-checkpoint", _resume(_rewrite("checkpoint.pkl", lambda b: b[:len(b) // 2])),
         "checkpoint.pkl is damaged", out=False, keeps_dir=KEEP, group="run_dir"),
    Case("resume-empty-checkpoint", _resume(_rewrite("checkpoint.pkl", lambda b: b"")),
         "checkpoint.pkl is damaged (empty)", out=False, keeps_dir=KEEP, group="run_dir"),
    Case("resume-no-checkpoint", _resume(_remove("checkpoint.pkl")), "not a run directory with a checkpoint",
         out=False, keeps_dir=KEEP, group="run_dir"),
    Case("resume-garbage-line-in-evals", _resume(_rewrite("evals.jsonl", _insert_garbage)),
         "evals.jsonl line 101 is damaged", out=False, keeps_dir=KEEP, group="run_dir"),
    Case("resume-no-evals", _resume(_remove("evals.jsonl")), "evals.jsonl is missing (200 evaluations",
         out=False, keeps_dir=KEEP, group="run_dir"),
    Case("resume-evals-cut-short", _resume(_rewrite("evals.jsonl", lambda b: b"".join(b.splitlines(True)[:50]))),
         "holds 50 evaluations, the checkpoint counts 200", out=False, keeps_dir=KEEP, group="run_dir"),
    Case("resume-with-config", _resume(lambda run: None, "--config", QUICKSTART),
         "--resume: the run directory holds its config", out=False, keeps_dir=KEEP, group="run_dir"),
    Case("resume-changing-the-strategy", _resume(lambda run: None, "--set", "strategy.name=cmaes"),
         "a resumed run may change only budget.*", out=False, keeps_dir=KEEP, group="run_dir"),
    Case("resume-inf-budget", _resume(lambda run: None, "--set", "budget.max_seconds=.inf"),
         "config budget.max_seconds: must be a finite number", out=False, keeps_dir=KEEP, group="run_dir"),
    Case("serve-port-out-of-range", _serve("99999"), "--port 99999: must lie in 1..65535", out=False, group="serve"),
    Case("serve-port-negative", _serve("-1"), "--port -1", out=False, group="serve"),
    Case("serve-port-in-use", _serve_busy, "already in use", out=False, group="serve"),
]

CASES: list[Case] = [*CONFIG_CASES, *TASK_FILE_CASES, *RUN_DIR_CASES]

# the same configs over good files, which must pass the checks (tests/test_bad_input.py): each case is
# refused for its defect, not for the set-up around it
GOOD = Defect("good", "choice", _lines, "")
CONTROLS = {"lm_tasks": _lm_tasks_case(GOOD), "api": _api_case(GOOD), "lm_eval": _lm_eval_case(GOOD)}
