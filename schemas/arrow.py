"""Explicit Arrow schemas generated from the pydantic records (never inferred from data)."""

from __future__ import annotations

import types
import typing
from functools import cache
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel

if typing.TYPE_CHECKING:
    import pyarrow as pa

M = TypeVar("M", bound=BaseModel)

def _scalars() -> dict[Any, "pa.DataType"]:
    import pyarrow as pa  # here, not at import: the CLI and the pipeline registry import the records

    return {int: pa.int64(), float: pa.float64(), str: pa.string(), bool: pa.bool_()}


def _arrow_type(annotation: Any) -> tuple["pa.DataType", bool]:
    """Arrow type of a field annotation and whether it is nullable."""
    import pyarrow as pa

    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unions other than Optional[X] are not supported: {annotation}")
        return _arrow_type(args[0])[0], True
    if origin is Literal:
        kinds = {type(v) for v in get_args(annotation)}
        if len(kinds) != 1:
            raise TypeError(f"mixed Literal types are not supported: {annotation}")
        return _scalars()[kinds.pop()], False
    if origin is list:
        (item,) = get_args(annotation)
        return pa.list_(_field("item", item)), False
    if origin is dict:
        key, value = get_args(annotation)
        return pa.map_(_arrow_type(key)[0], _arrow_type(value)[0]), False
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return pa.struct(list(arrow_schema(annotation))), False
    if annotation in _scalars():
        return _scalars()[annotation], False
    raise TypeError(f"no Arrow type for {annotation!r}")


def _field(name: str, annotation: Any) -> "pa.Field":
    import pyarrow as pa

    dtype, nullable = _arrow_type(annotation)
    return pa.field(name, dtype, nullable=nullable)


@cache
def arrow_schema(model: type[BaseModel]) -> "pa.Schema":
    import pyarrow as pa

    hints = typing.get_type_hints(model)
    return pa.schema([_field(name, hints[name]) for name in model.model_fields])


def to_table(model: type[M], rows: list[M]) -> "pa.Table":
    import pyarrow as pa

    schema = arrow_schema(model)
    return pa.Table.from_pylist([row.model_dump() for row in rows], schema=schema)


def from_table(model: type[M], table: "pa.Table") -> list[M]:
    """The rows as records; columns the record does not have (the storage's `item_id`, ...) are left out."""
    table = table.select([name for name in table.column_names if name in model.model_fields])
    return [model.model_validate(_nested_maps(model, row)) for row in table.to_pylist()]


def _nested_maps(model: type[BaseModel], row: dict) -> dict:
    """Turn Arrow map values (lists of pairs) back into dicts, at any depth of nested records."""
    hints = typing.get_type_hints(model)
    for name, annotation in hints.items():
        value = row.get(name)
        if value is None:
            continue
        inner = annotation
        if get_origin(inner) in (Union, types.UnionType):
            inner = next(a for a in get_args(inner) if a is not type(None))
        if get_origin(inner) is dict and isinstance(value, list):
            row[name] = dict(value)
        elif isinstance(inner, type) and issubclass(inner, BaseModel) and isinstance(value, dict):
            row[name] = _nested_maps(inner, value)
        elif get_origin(inner) is list:
            (item,) = get_args(inner)
            if isinstance(item, type) and issubclass(item, BaseModel):
                row[name] = [_nested_maps(item, v) for v in value]
    return row
