from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from minidistill.config import ConfigBase, ConfigError, field_docs, load_config, parse_overrides


@dataclass
class Inner(ConfigBase):
    """Inner settings."""

    lr: float = 1e-3
    """Learning rate."""
    steps: int = 10
    """Optimizer steps."""

    def validate(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"inner.steps={self.steps}: must be at least 1")


@dataclass
class Outer(ConfigBase):
    name: str = "run"
    """Run name."""
    inner: Inner = field(default_factory=Inner)
    """Nested settings."""
    layers: list[int] | None = None
    target: float | int | None = None
    mode: str = "a"


def test_nested_overrides_and_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ninner:\n  lr: 0.5\n")
    cfg = load_config(Outer, path, ["inner.steps=3", "--layers=[1, 2]", "target=0.5"])
    assert cfg.name == "x" and cfg.inner.lr == 0.5 and cfg.inner.steps == 3
    assert cfg.layers == [1, 2] and cfg.target == 0.5
    assert load_config(Outer, None, ["target=7"]).target == 7
    assert Outer.from_dict(cfg.to_dict()) == cfg


def test_unknown_key_suggests_nearest():
    with pytest.raises(ConfigError, match=r"unknown config key 'inner.stpes'.*did you mean 'inner.steps'"):
        Outer.from_dict({"inner": {"stpes": 3}})
    with pytest.raises(ConfigError, match="valid keys"):
        Outer.from_dict({"zzzzzz": 1})


def test_type_and_validation_errors_name_the_key():
    with pytest.raises(ConfigError, match="inner.steps must be an integer"):
        Outer.from_dict({"inner": {"steps": "many"}})
    with pytest.raises(ConfigError, match=r"inner.steps=0"):
        Outer.from_dict({"inner": {"steps": 0}})
    with pytest.raises(ConfigError, match=r"layers\[1\]"):
        Outer.from_dict({"layers": [1, "x"]})
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["inner.steps"])


def test_field_docs():
    assert field_docs(Inner) == {"lr": "Learning rate.", "steps": "Optimizer steps."}
