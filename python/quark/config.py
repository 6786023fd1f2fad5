"""Typed configs from YAML/JSON dicts: every step keeps its settings in a dataclass, and a malformed
recipe fails before any work starts with an error naming the key and the allowed values."""
import dataclasses
import typing


class ConfigError(ValueError):
    pass


def _check_type(where, key, value, tp):
    origin = typing.get_origin(tp) or (tp if tp in (list, tuple, dict) else None)
    if tp is typing.Any or value is None and (origin is typing.Union and type(None) in typing.get_args(tp)):
        return value
    if origin is typing.Union:
        for arg in typing.get_args(tp):
            try:
                return _check_type(where, key, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"{where}.{key}: expected {tp}, got {value!r}")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}.{key}: must be one of {list(allowed)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}.{key}: expected a list, got {value!r}")
        (arg,) = typing.get_args(tp)[:1] or (typing.Any,)
        return [_check_type(where, f"{key}[{i}]", v, arg) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}.{key}: expected a mapping, got {value!r}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(tp, type):
        if dataclasses.is_dataclass(tp):
            return from_dict(tp, value, f"{where}.{key}")
        if tp is int and isinstance(value, bool) or not isinstance(value, tp):
            raise ConfigError(f"{where}.{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls, data, where="config"):
    """Build dataclass `cls` from `data`, refusing unknown keys and wrongly typed values."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; allowed keys: {', '.join(names)}")
    return cls(**{k: _check_type(where, k, v, hints[k]) for k, v in data.items()})


def to_dict(obj):
    return dataclasses.asdict(obj)
