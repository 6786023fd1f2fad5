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


def read_settings(config_file=None, sets=()):
    """Settings from the command line: a YAML or JSON file, then KEY=VALUE items (VALUE parsed as YAML)."""
    from pathlib import Path

    import yaml
    cfg = {}
    if config_file:
        path = Path(config_file)
        if not path.exists():
            raise ConfigError(f"--config {path} does not exist")
        try:
            cfg = yaml.safe_load(path.read_text()) or {}   # YAML is a superset of JSON
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path} is not valid YAML/JSON: {e}") from None
        if not isinstance(cfg, dict):
            raise ConfigError(f"--config {path}: expected a mapping of settings")
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        try:
            cfg[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: VALUE is not valid YAML: {e}") from None
    return cfg


def field_help(cls):
    """{field: help text} of a config dataclass: the comment after each field, with the comment-only
    lines that continue it. Settings are documented once, beside their field, and `quark <step> --help`
    shows the same text."""
    import inspect
    import io
    import tokenize
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    helps, current, current_line = {}, None, None
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and tok.string in names and current_line != tok.start[0]:
            current, current_line = tok.string, tok.start[0]
        elif tok.type == tokenize.NAME and tok.start[1] == 4:
            current = None      # a method or another statement ends the field's comment
        elif tok.type == tokenize.COMMENT and current is not None:
            text = tok.string.lstrip("#").strip()
            helps[current] = f"{helps[current]} {text}" if current in helps else text
    return helps


@dataclasses.dataclass(frozen=True)
class Step:
    """A life-cycle step: its name (CLI command, recipe key and run folder), its settings dataclass and
    run(run_dir, settings dict) -> JSON-able stats. check(settings dict) validates beyond the types
    (default: from_dict). `quark <name>` is generated from config (quark.cli); its one-line help sits
    in quark.recipe.STEPS, which lists the steps without importing them."""
    name: str
    config: type
    run: typing.Callable
    check: typing.Callable = None

    def validate(self, cfg):
        """-> the settings dataclass; ConfigError names a bad key or value."""
        checked = self.check(cfg) if self.check is not None else None
        return checked if isinstance(checked, self.config) else from_dict(self.config, cfg, self.name)

    def settings(self, cfg):
        """The full, validated settings as a dict (defaults filled in): what a manifest records."""
        return to_dict(self.validate(cfg))
