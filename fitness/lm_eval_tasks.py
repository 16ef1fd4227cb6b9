"""lm-eval's tasks for the lm_eval fitness (fitness/lm_eval.py): its config, access to lm-eval, and the
tasks resolved and checked against the config (metric, filter, splits, shots; in the driver also their
data), once in the driver (`check`) and once per worker.
"""
from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from evomerge.errors import UserError
from evomerge.schema import Frozen

from .lm_tasks import check_unique_names, read_jsonl

INSTALL_HINT = "pip install 'evomerge[lm-eval]'"


def _check_limit(v):
    if v is not None and (isinstance(v, bool) or v <= 0):
        raise ValueError("must be > 0 (an integer: the first N examples; below 1: that fraction)")
    return v


class LMEvalTask(Frozen):
    name: str = Field(..., min_length=1, description="lm-eval task name (a single task, not a group or tag)")
    weight: float = Field(1.0, gt=0, description="weight of this task's metric in the fitness")
    metric: str = Field("acc", min_length=1,
                        description="metric the task reports, averaged per example (e.g. acc, acc_norm, "
                                    "exact_match); 'metric,filter' picks one of the task's filters")
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples per prompt (default: the "
                                                            "fitness's num_fewshot, else the task's own, else 0)")
    limit: int | float | None = Field(None, description="search on the first N examples of the split "
                                                        "(below 1: that fraction); default the fitness's "
                                                        "limit; the held-out split is scored whole")
    split: str | None = Field(None, description="dataset split searched on (default: the task's "
                                                "validation_split, else its test_split)")
    holdout_split: str | None = Field(None, description="dataset split scored for the best only (default: "
                                                        "the task's test_split unless it is searched on)")

    @field_validator("limit")
    @classmethod
    def _limit(cls, v):
        return _check_limit(v)


class LMEvalFitnessConfig(Frozen):
    name: Literal["lm_eval"]
    tasks: list[LMEvalTask] = Field(..., min_length=1, description="the tasks, in the order of the "
                                                                   "per-example scores")
    include_path: str | None = Field(None, description="directory of your own lm-eval task YAMLs (searched "
                                                       "before the built-in tasks)")
    num_fewshot: int | None = Field(None, ge=0, description="default num_fewshot of the tasks")
    limit: int | float | None = Field(None, description="default limit of the tasks")
    holdout: bool = Field(True, description="score the best on the tasks' held-out splits at the end")
    batch_size: int = Field(32, ge=1, description="requests per forward pass (lm-eval HFLM batch_size)")
    max_length: int | None = Field(None, ge=1, description="longest input in tokens; longer contexts are cut "
                                                           "from the left (default: the model config's)")
    apply_chat_template: bool = Field(False, description="format prompts with the tokenizer's chat template")
    fewshot_as_multiturn: bool = Field(False, description="with the chat template: few-shot examples as "
                                                          "separate user/assistant turns")
    system_instruction: str | None = Field(None, description="system prompt put before every prompt")
    fewshot_seed: int = Field(1234, description="seed of the few-shot example choice (the same examples "
                                                "for every candidate)")

    @field_validator("limit")
    @classmethod
    def _limit(cls, v):
        return _check_limit(v)

    @model_validator(mode="after")
    def _unique_names(self):
        check_unique_names(self.tasks)
        return self


# lm-eval access ------------------------------------------------------------------------------------

def import_lm_eval(full: bool = True):
    """lm-eval's modules; not full (the driver's check, which builds tasks only): the evaluator and
    the HF model wrapper are only looked for, not imported (2 s of transformers models on 2 cores)."""
    try:
        for module in ("lm_eval", "lm_eval.tasks", "lm_eval.evaluator", "lm_eval.models.huggingface"):
            if full or module in ("lm_eval", "lm_eval.tasks"):
                importlib.import_module(module)
            elif importlib.util.find_spec(module) is None:
                raise ImportError(f"No module named {module!r}")
    except ImportError as e:
        raise UserError(f"fitness.name: lm_eval needs lm-evaluation-harness ({e}); {INSTALL_HINT}") from None


def quiet_logs() -> None:
    """lm-eval's and datasets' loggers at WARNING (no per-call INFO lines), datasets' progress bars off."""
    for name in ("lm_eval", "lm-eval", "datasets", "evaluate"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_warning()
    except ImportError:
        pass


def _builtin_yaml_text() -> bytes:
    """All of lm-eval's own task YAMLs, concatenated (reading them is ~20x faster than indexing them)."""
    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    return b"\n".join(p.read_bytes() for p in sorted(root.rglob("*.yaml")))


_NAME_LINE = re.compile(rb"^[ \t-]*(?:task|group|tag)[ \t]*:[ \t]*['\"]?([A-Za-z0-9_.:+\-]+)", re.M)


def _task_manager(cfg: LMEvalFitnessConfig):
    """(TaskManager, names to suggest from): a TaskManager that knows every configured task that exists.

    Indexing lm-eval's ~15k own task YAMLs takes seconds (8 s here), so it is built only when a task
    is not in include_path and its name appears in those files' text at all (a misspelt name does
    not: it is refused in a fraction of a second, with suggestions from the names in that text).
    """
    from lm_eval.tasks import TaskManager

    names = [t.name for t in cfg.tasks]
    if cfg.include_path:
        tm = TaskManager(include_path=cfg.include_path, include_defaults=False)
    else:
        tm = TaskManager(include_defaults=False)
    missing = [n for n in names if n not in tm.all_tasks]
    if not missing:
        return tm, tm.all_tasks
    text = _builtin_yaml_text()
    if not any(n.encode() in text for n in missing):
        builtin = sorted({m.decode() for m in _NAME_LINE.findall(text)})
        return tm, [*tm.all_tasks, *builtin]
    tm = TaskManager(include_path=cfg.include_path) if cfg.include_path else TaskManager()
    return tm, tm.all_tasks


def _build_tasks(tm, names: list[str]) -> dict:
    loaded = tm.load(list(names))
    return loaded["tasks"]


@dataclass(frozen=True)
class TaskPlan:
    """One task as resolved against its lm-eval config."""

    name: str
    metric: str         # metric name as lm-eval keys it, without the filter
    filter: str         # the filter whose per-sample values we read ('none' when the task has no filter_list)
    key: str            # the metric as configured: the names of our metrics
    split: str
    holdout_split: str | None
    num_fewshot: int
    limit: int | float | None
    weight: float


def _filters(task) -> list[str]:
    return [f.name for f in getattr(task, "_filters", [])] or ["none"]


def _resolve(cfg: LMEvalFitnessConfig, i: int, spec: LMEvalTask, task) -> TaskPlan:
    """Check one built task against its config entry; UserError naming the field."""
    where = f"fitness.tasks[{i}]"
    agg = task.aggregation()
    filters = _filters(task)
    produced = [m if len(filters) == 1 else f"{m},{f}" for m in agg for f in filters]
    metric, _, filt = spec.metric.partition(",")
    if metric not in agg or (filt and filt not in filters):
        raise UserError(f"{where}.metric: task '{spec.name}' produces {produced}, not '{spec.metric}'")
    if not filt:
        if len(filters) > 1 and "none" not in filters:
            raise UserError(f"{where}.metric: task '{spec.name}' has filters {filters}; name one, e.g. "
                            f"'{metric},{filters[0]}'")
        filt = "none" if "none" in filters else filters[0]
    from lm_eval.api.metrics import mean

    if agg[metric] is not mean:
        name = getattr(agg[metric], "__name__", str(agg[metric]))
        raise UserError(f"{where}.metric: '{metric}' of task '{spec.name}' is aggregated over the whole split "
                        f"({name}), so it has no per-example score; choose a metric averaged per example")
    if not task.higher_is_better().get(metric, True):
        raise UserError(f"{where}.metric: lower is better for '{metric}' of task '{spec.name}'; the search "
                        "maximises: choose a metric where higher is better")

    splits = list(getattr(task, "dataset", None) or [])
    val, test = task.get_config("validation_split"), task.get_config("test_split")
    split = spec.split or val or test
    if split is None:
        raise UserError(f"{where}.split: task '{spec.name}' names no validation or test split; set one of {splits}")
    if splits and split not in splits:
        raise UserError(f"{where}.split: task '{spec.name}' has splits {splits}, not '{split}'")
    holdout = spec.holdout_split or (test if test and test != split else None)
    if spec.holdout_split and splits and holdout not in splits:
        raise UserError(f"{where}.holdout_split: task '{spec.name}' has splits {splits}, not '{holdout}'")
    if holdout == split:
        raise UserError(f"{where}.holdout_split: '{holdout}' is the split searched on; hold out another one")

    shots = spec.num_fewshot if spec.num_fewshot is not None else cfg.num_fewshot
    if shots is None:
        shots = task.get_config("num_fewshot") or 0
    if shots > 0 and not hasattr(task, "sampler"):
        field = (f"{where}.num_fewshot" if spec.num_fewshot is not None else
                 "fitness.num_fewshot" if cfg.num_fewshot is not None else f"{where}.name")
        raise UserError(f"{field}: task '{spec.name}' has no split to draw {shots} few-shot examples from")
    limit = spec.limit if spec.limit is not None else cfg.limit
    return TaskPlan(spec.name, metric, filt, spec.metric, split, holdout, int(shots), limit, spec.weight)


def load_checked(cfg: LMEvalFitnessConfig, check_data: bool = False) -> tuple[dict, list[TaskPlan]]:
    """Build the configured tasks (datasets included) and resolve them; UserError naming the field.

    check_data (the driver's check, not the workers): the local JSONL data files of the tasks in
    `include_path` are read first (a defect there is named by file and line, not by the datasets
    library's 'An error occurred while generating the dataset'), and after the build every example of
    their searched and held-out splits must make a prompt, choices and an answer lm-eval can score."""
    import_lm_eval(full=not check_data)
    if cfg.include_path is not None and not Path(cfg.include_path).is_dir():
        raise UserError(f"fitness.include_path: {cfg.include_path}: no such directory")
    tm, known = _task_manager(cfg)
    groups = set(getattr(tm, "all_groups", [])) | set(getattr(tm, "all_tags", []))
    for i, t in enumerate(cfg.tasks):
        if t.name in groups:
            raise UserError(f"fitness.tasks[{i}].name: '{t.name}' is a group or tag of lm-eval tasks; "
                            "list the tasks you want one by one")
        if t.name not in tm.all_tasks:
            near = difflib.get_close_matches(t.name, known, n=3)
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            where = f" in {cfg.include_path} or lm-eval's own tasks" if cfg.include_path else ""
            raise UserError(f"fitness.tasks[{i}].name: no lm-eval task '{t.name}'{where}{hint}")
    files = {}  # task name -> {split: (path, [line numbers of its rows])} of its local JSONL data files
    if check_data:
        for i, t in enumerate(cfg.tasks):
            files[t.name] = _scan_data_files(cfg, tm, i, t.name)
    tasks = {}
    for i, t in enumerate(cfg.tasks):  # one by one: a failure names its task
        try:
            with _quiet_datasets(check_data):
                tasks.update(_build_tasks(tm, [t.name]))
        except Exception as e:  # noqa: BLE001 - lm-eval and datasets raise anything
            raise UserError(f"fitness.tasks[{i}].name: task '{t.name}' cannot be loaded: {_why(e)}") from None
    plans = [_resolve(cfg, i, t, tasks[t.name]) for i, t in enumerate(cfg.tasks)]
    if check_data:
        for i, p in enumerate(plans):
            if files.get(p.name) is not None:
                _check_docs(i, p, tasks[p.name], files[p.name])
    return tasks, plans


def _why(e: BaseException) -> str:
    """One line: the error's message, followed by its innermost cause's when that differs (datasets
    wraps a reader's error in 'An error occurred while generating the dataset')."""
    def first_line(err):
        text = str(err).strip()
        return text.splitlines()[0] if text else type(err).__name__

    chain = [e]
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and nxt not in chain:
        chain.append(nxt)
    msg = first_line(e)
    if len(chain) > 1 and first_line(chain[-1]) not in msg:
        msg = f"{msg}: {first_line(chain[-1])}"
    return msg[:300]


@contextlib.contextmanager
def _quiet_datasets(on: bool):
    """The datasets library logs a reader's failure (e.g. 'Failed to load JSON ...') besides raising it:
    in the driver's check the raised error is the one line the user gets."""
    if not on:
        yield
        return
    lg = logging.getLogger("datasets")
    level = lg.level
    lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        lg.setLevel(level)


def _task_entry_config(tm, name: str) -> tuple[dict | None, Path | None]:
    """(the task's YAML config as the TaskManager indexed it, its YAML path); (None, None) if unknown."""
    entry = getattr(tm, "task_index", {}).get(name)
    if entry is None:
        return None, None
    get = entry.get if isinstance(entry, dict) else lambda k: getattr(entry, k, None)
    cfg, path = get("cfg"), get("yaml_path")
    return (cfg if isinstance(cfg, dict) else None), (Path(path) if path else None)


def _scan_data_files(cfg: LMEvalFitnessConfig, tm, i: int, name: str) -> dict | None:
    """Read the local JSONL data files of a task defined in include_path (dataset_path: json):
    {split: (path, line numbers of its rows)}; None when the task is not one of those."""
    if not cfg.include_path:
        return None
    task_cfg, yaml_path = _task_entry_config(tm, name)
    if task_cfg is None or yaml_path is None or task_cfg.get("dataset_path") not in ("json", "jsonl"):
        return None
    try:
        yaml_path.resolve().relative_to(Path(cfg.include_path).resolve())
    except ValueError:
        return None
    data_files = (task_cfg.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(data_files, (str, list)):
        data_files = {"train": data_files}
    if not isinstance(data_files, dict):
        return None
    out = {}
    for split, paths in data_files.items():
        paths = [paths] if isinstance(paths, str) else paths
        if not isinstance(paths, list) or not all(isinstance(f, str) for f in paths):
            return None
        lines = []
        for f in paths:
            if "://" in f or any(c in f for c in "*?["):
                return None  # remote or a glob: the datasets library resolves it
            lines.append((f, [no for no, _ in read_jsonl(f, f"fitness.tasks[{i}].name: task '{name}'")]))
        out[str(split)] = lines
    return out


def _check_docs(i: int, plan: TaskPlan, task, files: dict) -> None:
    """Every example of the searched and held-out splits: a prompt that is not empty, and for a
    multiple-choice task non-empty choices and an answer that is one of them (lm-eval would score a
    wrong one as a miss, with a warning per candidate); for generate_until an answer."""
    kind = task.get_config("output_type")
    for split in (plan.split, plan.holdout_split):
        if split is None or split not in (getattr(task, "dataset", None) or {}):
            continue
        docs = task.dataset[split]
        process = task.get_config("process_docs")
        if callable(process):
            docs = process(docs)
        lines = None
        if not callable(process) and len(files.get(split, [])) == 1:
            path, lines = files[split][0]

        def bad(k: int, msg: str):
            at = (f"{path} line {lines[k]}" if lines is not None and k < len(lines)
                  else f"split '{split}' example {k + 1}")
            raise UserError(f"fitness.tasks[{i}].name: task '{plan.name}': {at}: {msg}")

        def field(attr: str, role: str) -> str:
            v = task.get_config(attr)
            return f"'{v}'" if isinstance(v, str) and v in (task.features or []) else f"the {role} ({attr})"

        for k, doc in enumerate(docs):
            try:
                text = task.doc_to_text(doc)
                target = task.doc_to_target(doc)
                choices = task.doc_to_choice(doc) if kind == "multiple_choice" else None
            except Exception as e:  # noqa: BLE001 - a template over a missing field raises anything
                bad(k, f"cannot build the example: {type(e).__name__}: {_why(e)}")
            if kind not in ("multiple_choice", "generate_until"):
                continue
            prompt, answer = field("doc_to_text", "prompt"), field("doc_to_target", "answer")
            if text is None:
                bad(k, f"missing {prompt}")
            if isinstance(text, str) and not text.strip():
                bad(k, f"{prompt} is empty")
            if target is None:
                bad(k, f"missing {answer}")
            if isinstance(target, bool):
                bad(k, f"{answer} is a boolean (got {target!r})")
            if kind != "multiple_choice":
                continue
            if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
                bad(k, f"{field('doc_to_choice', 'choices')} must be a list of non-empty strings (got {choices!r})")
            golds = target if isinstance(target, list) else [target]
            for g in golds:
                if isinstance(g, bool) or not (isinstance(g, int) and 0 <= g < len(choices)
                                               or isinstance(g, str) and g in choices):
                    bad(k, f"{answer} must be the index of the right choice, "
                           f"0..{len(choices) - 1} (got {g!r})")
