from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from vlkit.config import apply_overrides, from_dict, load_yaml, save_yaml, to_dict
from vlkit.errors import ConfigError


@dataclass
class Inner:
    width: int = 8
    act: Literal["gelu", "quick_gelu"] = "gelu"


@dataclass
class Outer:
    name: str
    lr: float = 1e-4
    sizes: tuple[int, ...] = (1, 2)
    inner: Inner = field(default_factory=Inner)
    path: Path | None = None

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError("lr must be positive")


def test_roundtrip(tmp_path):
    cfg = from_dict(Outer, {"name": "x", "lr": 1, "sizes": [3, 4], "inner": {"act": "quick_gelu"}, "path": "a/b"})
    assert cfg == Outer("x", 1.0, (3, 4), Inner(8, "quick_gelu"), Path("a/b"))
    assert isinstance(cfg.lr, float)
    save_yaml(cfg, tmp_path / "c.yaml")
    assert load_yaml(Outer, tmp_path / "c.yaml") == cfg
    assert to_dict(cfg)["sizes"] == [3, 4]


@pytest.mark.parametrize(
    "data, message",
    [
        ({"name": "x", "inner": {"widht": 3}}, "unknown key inner.widht"),
        ({"lr": 1.0}, "missing required key name"),
        ({"name": "x", "inner": {"act": "relu"}}, "inner.act: 'relu' is not one of"),
        ({"name": "x", "lr": "fast"}, "lr: expected a number"),
        ({"name": "x", "inner": {"width": 2.5}}, "inner.width: expected an integer"),
        ({"name": "x", "inner": {"width": True}}, "inner.width: expected an integer"),
        ({"name": "x", "sizes": "12"}, "sizes: expected a list"),
        ({"name": "x", "lr": -1}, "lr must be positive"),
    ],
)
def test_errors_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        from_dict(Outer, data)


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nextra: 1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key extra"):
        load_yaml(Outer, bad)
    with pytest.raises(ConfigError, match="no such file"):
        load_yaml(Outer, tmp_path / "missing.yaml")


def test_overrides():
    data = apply_overrides({"name": "x", "inner": {"width": 1}}, ["inner.width=5", "lr=2e-5", "sizes=[7]"])
    assert from_dict(Outer, data) == Outer("x", 2e-5, (7,), Inner(5))
    with pytest.raises(ConfigError, match="not of the form"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ConfigError, match="unknown key inner.depth"):
        from_dict(Outer, apply_overrides({"name": "x"}, ["inner.depth=3"]))
