"""The request schema of `evomerge serve`, shared by the server (which parses and validates requests
with it) and the API fitness (which builds the ``merge`` field it sends with it): pydantic only.

A request's body may carry ``"merge": {"weights": {expert: w, ...}, "density": {...}, "gamma": {...}}``
(one value per expert for the whole model), ``"merge": {"t": t}`` (slerp) or ``"merge": {"recipe": {...}}``
(a full recipe as evals.jsonl logs it). Every coefficient is a finite number of magnitude at most
MAX_COEFFICIENT; a density lies in (0, 1]. What breaks a rule is a RequestError (a 400) naming the field.
"""
from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

# the largest magnitude of a merge coefficient in a request: a task-arithmetic weight of 100 already
# swamps the base model; beyond, a merge only overflows (1e308 * a tensor is Inf, then NaN)
MAX_COEFFICIENT = 100.0
Coefficient = Annotated[float, Field(allow_inf_nan=False, ge=-MAX_COEFFICIENT, le=MAX_COEFFICIENT)]
SEED = Field(None, ge=-(2 ** 63), le=2 ** 64 - 1)  # what torch.Generator.manual_seed takes


class RequestError(Exception):
    """A request the server refuses: the HTTP status, the message, the field it names (`param`) and
    OpenAI's error code (e.g. context_length_exceeded), answered in OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class MergeSpec(BaseModel):
    """The ``merge`` field of a request: per-expert maps (label -> value, in mergekit's names except
    `weights`), slerp's `t`, or a whole `recipe`."""

    model_config = ConfigDict(extra="forbid")
    weights: dict[str, Coefficient] | None = None
    density: dict[str, Coefficient] | None = None
    gamma: dict[str, Coefficient] | None = None
    t: Coefficient | None = None
    recipe: dict[str, Any] | None = None

    def to_body(self) -> dict:
        """The field as sent on the wire (the request body's ``merge``): the parts given, nothing else."""
        return self.model_dump(exclude_none=True)

    def per_expert(self, labels: list[str]) -> dict[str, list[float]]:
        """The per-expert values in recipe form ({"weight" | "density" | "gamma": one value per label, 0
        where a label is not given}); a RequestError naming an unknown expert, a density outside (0, 1],
        or a field with none of weights, density, gamma, t."""
        per: dict[str, list[float]] = {}
        for name, given in (("weights", self.weights), ("density", self.density), ("gamma", self.gamma)):
            if given is None:
                continue
            bad = sorted(set(given) - set(labels))
            if bad:
                raise RequestError(400, f"merge.{name}: unknown expert {bad[0]!r}; experts: {', '.join(labels)}",
                                   f"merge.{name}")
            per["weight" if name == "weights" else name] = [float(given.get(k, 0.0)) for k in labels]
        if not per and self.t is None:
            raise RequestError(400, "merge: give weights (and density, gamma), t, or a recipe", "merge")
        for k, v in enumerate(per.get("density", [])):
            if not 0.0 < v <= 1.0:
                raise RequestError(400, f"merge.density: {labels[k]}: must lie in (0, 1]", "merge.density")
        return per

    def checked_recipe(self, labels: list[str], groups: list[str]) -> dict:
        """The given recipe, once it names a method, these experts and these tensor groups and its numbers
        pass check_recipe_numbers; else a RequestError naming the part."""
        r = self.recipe
        if not isinstance(r.get("groups"), dict) or r.get("experts") != labels or "method" not in r:
            raise RequestError(400, f"merge.recipe: needs 'method', 'experts' = {labels} and 'groups'",
                               "merge.recipe")
        if set(r["groups"]) != set(groups):
            raise RequestError(400, f"merge.recipe.groups: expected {groups}", "merge.recipe")
        check_recipe_numbers(r, "merge.recipe")
        return r


def check_recipe_numbers(value: Any, where: str) -> None:
    """A recipe's numbers: finite, coefficients (in `groups`) within +-MAX_COEFFICIENT, densities in
    (0, 1], the seed an integer torch can take; a RequestError (400) naming the first bad one."""
    if isinstance(value, dict):
        for k, v in value.items():
            check_recipe_numbers(v, f"{where}.{k}")
        return
    if isinstance(value, list):
        for i, v in enumerate(value):
            check_recipe_numbers(v, f"{where}[{i}]")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if where == "merge.recipe.seed":
        if not isinstance(value, int) or not -(2 ** 63) <= value < 2 ** 64:
            raise RequestError(400, f"{where}: must be an integer in [-2**63, 2**64)", where)
        return
    if not math.isfinite(value):
        raise RequestError(400, f"{where}: {value}: must be a finite number", where)
    if where.startswith("merge.recipe.groups.") and abs(value) > MAX_COEFFICIENT:
        raise RequestError(400, f"{where}: {value:g}: a coefficient's magnitude is at most {MAX_COEFFICIENT:g}",
                           where)
    if ".density[" in where and not 0.0 < value <= 1.0:
        raise RequestError(400, f"{where}: {value:g}: a density lies in (0, 1]", where)


class _Sampling(BaseModel):
    """What completions and chat requests share: the model, sampling, stop strings, seed and the merge."""

    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields (user, presence_penalty, ...) are ignored
    model: str
    max_tokens: int | None = Field(None, ge=0, le=4096)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1)
    stop: str | list[str] | None = None
    seed: int | None = SEED
    merge: MergeSpec | None = None

    def stops(self) -> list[str]:
        """The stop strings as a list (none: empty)."""
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_Sampling):
    """POST /v1/completions: one prompt or a list, with OpenAI's logprobs (top-k) and echo."""

    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class ChatMessage(BaseModel):
    """One message of a chat: its role and text."""

    role: str
    content: str


class ChatRequest(_Sampling):
    """POST /v1/chat/completions: the messages, max_completion_tokens (or max_tokens) and logprobs."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0, le=4096)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
