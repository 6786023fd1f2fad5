from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from quark.config import ConfigError, from_dict


@dataclass
class Inner:
    rate: float = 0.1


@dataclass
class Cfg:
    steps: int = 10
    mode: Literal["fast", "slow"] = "fast"
    name: Optional[str] = None
    tags: list = field(default_factory=list)
    inner: Inner = field(default_factory=Inner)


def test_builds_with_defaults_and_coerces_int_to_float():
    c = from_dict(Cfg, {"steps": 3, "inner": {"rate": 1}})
    assert c.steps == 3 and c.inner.rate == 1.0 and isinstance(c.inner.rate, float)
    assert from_dict(Cfg, None) == Cfg()


@pytest.mark.parametrize("data,message", [
    ({"stpes": 3}, "unknown key 'stpes'; allowed keys: steps, mode, name, tags, inner"),
    ({"mode": "medium"}, "cfg.mode: must be one of ['fast', 'slow']"),
    ({"steps": "ten"}, "cfg.steps: expected int"),
    ({"steps": True}, "cfg.steps: expected int"),
    ({"inner": {"rate": "x"}}, "cfg.inner.rate: expected float"),
    ({"tags": "a"}, "cfg.tags: expected a list"),
    ([1, 2], "cfg: expected a mapping"),
])
def test_errors_name_the_key_and_allowed_values(data, message):
    with pytest.raises(ConfigError) as e:
        from_dict(Cfg, data, "cfg")
    assert message in str(e.value)
