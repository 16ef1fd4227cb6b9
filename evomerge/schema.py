"""Base class of every config section: frozen, unknown fields are errors, numbers are numbers.

* ``.inf`` / ``.nan`` (and ``-.inf``) are refused for every float, nested ones included
  (``allow_inf_nan=False`` reaches the floats in lists, dicts and unions of a section).
* A boolean is refused where a number is expected (pydantic would read ``true`` as 1): checked before
  validation for every field whose type admits numbers but not booleans, inside lists, tuples, dicts
  and unions too (nested sections check their own fields).
"""
from __future__ import annotations

import types
import typing
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError

_UNIONS = (Union, types.UnionType)


def _admits_bool(tp: Any) -> bool:
    if tp is bool or tp is Any or tp is object:
        return True
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _admits_bool(typing.get_args(tp)[0])
    if origin in _UNIONS:
        return any(_admits_bool(a) for a in typing.get_args(tp))
    if origin is Literal:
        return any(isinstance(a, bool) for a in typing.get_args(tp))
    return False


def _number_kind(tp: Any) -> str | None:
    """'an integer' / 'a number' when `tp` takes numbers (and not booleans), else None."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _number_kind(typing.get_args(tp)[0])
    if origin in _UNIONS:
        kinds = {_number_kind(a) for a in typing.get_args(tp)} - {None}
        return None if not kinds else "an integer" if kinds == {"an integer"} else "a number"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    return None


def _members(tp: Any) -> tuple:
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _members(typing.get_args(tp)[0])
    if origin in _UNIONS:
        return tuple(m for a in typing.get_args(tp) for m in _members(a))
    return (tp,)


def bool_problem(tp: Any, value: Any, at: str = "") -> tuple[str, str, bool] | None:
    """(where, 'an integer' | 'a number', the boolean) when `value` puts a boolean where `tp` wants a number, else None;
    `where` is the path inside the value ('' for the value itself, '.key' or '.i' inside it)."""
    if isinstance(value, bool):
        if _admits_bool(tp):
            return None
        kind = _number_kind(tp)
        return (at, kind, value) if kind else None
    if isinstance(value, (list, tuple, dict)):
        for member in _members(tp):
            origin, args = typing.get_origin(member), typing.get_args(member)
            if isinstance(value, dict) and origin is dict and len(args) == 2:
                for k, v in value.items():
                    found = bool_problem(args[1], v, f"{at}.{k}")
                    if found:
                        return found
            elif isinstance(value, (list, tuple)) and origin in (list, tuple, set, frozenset) and args:
                for i, v in enumerate(value):
                    item = args[0] if origin is not tuple or args[-1] is Ellipsis else (
                        args[i] if i < len(args) else None)
                    found = None if item is None else bool_problem(item, v, f"{at}.{i}")
                    if found:
                        return found
    return None


BOOL_ERROR = "bool_not_number"  # the error type; ctx: field (its name), at (inside it), kind, value


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, data: Any) -> Any:
        # a model validator, not a field one: pydantic allows no `before` validator on the discriminator
        if isinstance(data, dict):
            for name, value in data.items():
                if isinstance(value, (bool, list, tuple, dict)) and name in cls.model_fields:
                    found = bool_problem(cls.model_fields[name].annotation, value)
                    if found:
                        raise PydanticCustomError(BOOL_ERROR, "{field}{at}: Input should be {kind}, not a boolean",
                                                  {"field": name, "at": found[0], "kind": found[1],
                                                   "value": found[2]})
        return data
