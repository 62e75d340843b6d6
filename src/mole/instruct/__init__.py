"""InstructMoLE: instruction-guided routing, orthogonality and load-balancing losses, jointly trained DiT experts,
multi-conditional inputs as extra tokens (PixArt: typed tokens; Flux: the Kontext way).

The `official` variant (default) follows the published code (yanq095/InstructMoLE); `package` keeps this package's
earlier choices. `TopKGate` and `expert_orthogonality` have the official interfaces.
"""

from .conditions import ConditionTokens, KontextConditions, routing_heatmap
from .gate import (
    TopKGate,
    balance_from_counts,
    balance_from_mass,
    cosine_decay,
    cosine_penalty,
    decay_weight,
    expert_orthogonality,
)
from .model import InstructMoLE, fresh_experts
from .resampler import MaskedResampler, PerceiverResampler
from .router import InstructRouter, Pooling, Routing
from .shared import SharedLoRA
from .variants import VARIANTS, Decay, InstructConfig, Variant

__all__ = [
    "VARIANTS", "ConditionTokens", "Decay", "InstructConfig", "InstructMoLE", "InstructRouter", "KontextConditions",
    "MaskedResampler", "PerceiverResampler", "Pooling", "Routing", "SharedLoRA", "TopKGate", "Variant",
    "balance_from_counts", "balance_from_mass", "cosine_decay", "cosine_penalty", "decay_weight",
    "expert_orthogonality", "fresh_experts", "routing_heatmap",
]  # fmt: skip
