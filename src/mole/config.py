"""Configuration of a Mixture of Low-rank Experts.

Options are enums, not free strings, and every check names the field, the bad value and the fix.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import Any


class MoLEConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


class Gating(str, enum.Enum):
    """Which gates modulate the experts (the paper's Table 3 ablation)."""

    LOCAL = "local"  # per-token score s = sigmoid(X phi + b), shape n x E
    GLOBAL = "global"  # per-sample score g = sigmoid(Pool(.) w + c), shape E
    BOTH = "both"  # the full MoLE: g_i * E_i(X * s_i)
    NONE = "none"  # no gates: X' = F(X) + sum_i E_i(X) (plain LoRA; stage-2 training, fixed-weight mixing)

    @property
    def uses_local(self) -> bool:
        return self in (Gating.LOCAL, Gating.BOTH)

    @property
    def uses_global(self) -> bool:
        return self in (Gating.GLOBAL, Gating.BOTH)


class GlobalSource(str, enum.Enum):
    """What the global gate pools over tokens before its projection.

    INPUT: the paper's eq. 7, g = sigmoid(mean_tokens(X) @ w + c), w in R^{d_in x E}.
    EXPERT_OUTPUT: the official code's variant, g_i = sigmoid(mean_tokens(scale_i * E_i(X)) @ w_i + c_i),
    one w_i in R^{d_out} per expert (pooled from the expert's own scaled output, before the local gate).
    """

    INPUT = "input"
    EXPERT_OUTPUT = "expert_output"


class GateInit(str, enum.Enum):
    """How gate projections start.

    DEFAULT: torch.nn.Linear's default init (what the official code uses).
    ZERO: weights and biases zero, so every gate starts at sigmoid(0) = 0.5.
    """

    DEFAULT = "default"
    ZERO = "zero"


def _coerce_enum(enum_cls: type[enum.Enum], value: Any, field_name: str) -> Any:
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in enum_cls)
        raise MoLEConfigError(f"{field_name}={value!r} is not valid; use one of {allowed}") from None


@dataclass
class MoLEConfig:
    """How experts are mixed in every wrapped layer.

    gating: which gates are used (local, global or both; none for plain LoRA experts).
    global_source: what the global gate pools (the paper's input X, or the official code's expert outputs).
    gate_init: initial values of the gate projections.
    targets: regular expressions over module paths that may be wrapped; None means the backbone's table
        (see mole.targets). A module is wrapped when it matches and at least one expert has weights for it.
    """

    gating: Gating = Gating.BOTH
    global_source: GlobalSource = GlobalSource.INPUT
    gate_init: GateInit = GateInit.DEFAULT
    targets: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        self.gating = _coerce_enum(Gating, self.gating, "gating")
        self.global_source = _coerce_enum(GlobalSource, self.global_source, "global_source")
        self.gate_init = _coerce_enum(GateInit, self.gate_init, "gate_init")
        if self.targets is not None:
            if isinstance(self.targets, str):
                raise MoLEConfigError(
                    f"targets={self.targets!r} is a string; pass a list of regular expressions, e.g. [{self.targets!r}]"
                )
            self.targets = tuple(self.targets)
            if not self.targets:
                raise MoLEConfigError("targets=() matches nothing; pass None to use the backbone's target table")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gating"] = self.gating.value
        d["global_source"] = self.global_source.value
        d["gate_init"] = self.gate_init.value
        d["targets"] = list(self.targets) if self.targets is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MoLEConfig:
        known = {"gating", "global_source", "gate_init", "targets"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise MoLEConfigError(f"unknown MoLEConfig field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**d)
