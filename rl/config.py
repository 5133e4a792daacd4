"""Config loading: YAML files (with inheritance) + `key.sub=value` overrides -> a typed schema.

OmegaConf does the YAML loading, merging and dotted overrides; pydantic validates against the schema.
Every problem becomes one InputError line naming the key (with a did-you-mean suggestion), raised
before any work starts.

A YAML file may inherit from others with a top-level `defaults:` list of paths relative to itself;
later entries and the file itself override earlier ones.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ValidationError

from core.config import dump_config  # noqa: F401  (re-exported for commands)
from core.errors import InputError

S = TypeVar("S", bound=BaseModel)
INHERIT_KEY = "defaults"


def load_yaml_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> DictConfig:
    """Loads a YAML file and, recursively, the files it inherits from, merged in order."""
    path = Path(path).resolve()
    if path in _seen:
        raise InputError(f"{path}: inheritance cycle through {' -> '.join(str(p) for p in _seen)}")
    if not path.is_file():
        raise InputError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise InputError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    parents = raw.pop(INHERIT_KEY, []) or []
    if isinstance(parents, str):
        parents = [parents]
    merged = OmegaConf.create({})
    for parent in parents:
        merged = OmegaConf.merge(merged, load_yaml_tree(path.parent / parent, (*_seen, path)))
    return OmegaConf.merge(merged, OmegaConf.create(raw))


def apply_overrides(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise InputError(f"override {item!r} is not of the form key.sub=value")
    try:
        return OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        raise InputError(f"bad override: {e}".splitlines()[0]) from None


def _fields_at(schema: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names of the (nested) schema section that `loc` points into."""
    model: Any = schema
    for key in loc:
        field = getattr(model, "model_fields", {}).get(key)
        if field is None:
            break
        ann = field.annotation
        model = next((a for a in getattr(ann, "__args__", ()) if isinstance(a, type)), ann)
    return list(getattr(model, "model_fields", {}))


def format_validation_error(schema: type[BaseModel], err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = tuple(first["loc"])
    key = ".".join(str(p) for p in loc)
    if first["type"] == "extra_forbidden":
        known = _fields_at(schema, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"; did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?" if close else ""
        return f"{source}: unknown key '{key}'{hint}"
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"{source}: '{key}': {first['msg']}{shown}"


def to_container(cfg: DictConfig | ListConfig) -> dict[str, Any]:
    try:
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise InputError(f"cannot resolve config: {e}".splitlines()[0]) from None


def load_config(schema: type[S], path: str | Path | None, overrides: list[str] | None = None) -> S:
    """YAML file (or only defaults when path is None) + overrides -> validated schema instance."""
    cfg = load_yaml_tree(path) if path else OmegaConf.create({})
    cfg = apply_overrides(cfg, overrides or [])
    try:
        return schema.model_validate(to_container(cfg))
    except ValidationError as e:
        raise InputError(format_validation_error(schema, e, str(path or "config"))) from None
