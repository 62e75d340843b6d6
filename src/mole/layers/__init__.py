"""Building blocks: a LoRA expert's factors, the gates, and the MoLE layer that combines them."""

from .gates import MoLEGates
from .lora import LoraPair
from .mole_layer import MoLELayer, check_wrappable

__all__ = ["LoraPair", "MoLEGates", "MoLELayer", "check_wrappable"]
