"""InstructMoLE: instruction-guided routing, orthogonality and load-balancing losses, jointly trained DiT experts,
multi-conditional inputs as extra tokens."""

from .conditions import ConditionTokens, routing_heatmap
from .model import Decay, InstructConfig, InstructMoLE
from .router import InstructRouter, Pooling, Routing, load_balance_loss, orthogonality_loss, schedule_weight

__all__ = [
    "ConditionTokens", "Decay", "InstructConfig", "InstructMoLE", "InstructRouter", "Pooling", "Routing",
    "load_balance_loss", "orthogonality_loss", "routing_heatmap", "schedule_weight",
]  # fmt: skip
