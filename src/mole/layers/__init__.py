"""Building blocks: a LoRA expert's factors, the gates, and the MoLE layer that combines them."""

from .gates import MoLEGates
from .lora import LoraPair
from .mole_layer import MoLELayer, check_wrappable, is_pointwise, layer_dims
from .spatial import SpatialMoLELayer, mole_layer_for

__all__ = ["LoraPair", "MoLEGates", "MoLELayer", "SpatialMoLELayer", "check_wrappable", "is_pointwise",
           "layer_dims", "mole_layer_for"]  # fmt: skip
