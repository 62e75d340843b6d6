"""What several file formats share: reading a safetensors file, building and checking LoRA pairs, and the names of
adapter kinds that are not a plain low-rank pair (LoHa, LoKr, DoRA, ...), which MoLE cannot mix."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..experts import ExpertLoadError
from ..layers.lora import LoraPair


def read_safetensors(path: Path, tensors: bool = True) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file (tensors=False: the header only, tensors {}); a ValueError says
    why it is unreadable."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}, ({k: f.get_tensor(k) for k in f.keys()} if tensors else {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc})") from None


# Tensor names of LyCORIS / peft variants that are not a plain low-rank pair, and what they are.
_UNSUPPORTED = (
    (re.compile(r"(^|[._])hada_"), "LoHa (hada_*)"),
    (re.compile(r"(^|[._])lokr_"), "LoKr (lokr_*)"),
    (re.compile(r"(^|[._])dora_scale$"), "DoRA (dora_scale)"),
    (re.compile(r"(^|\.)lora_magnitude_vector\b"), "DoRA (lora_magnitude_vector)"),
    (re.compile(r"\.lora_mid\.weight$"), "LoCon with CP / Tucker decomposition (lora_mid)"),
    (re.compile(r"\.(diff|diff_b)$"), "full weight difference (LyCORIS diff)"),
    (re.compile(r"\.on_input$|\.(ia3_l|ia3)\b"), "IA3"),
    (re.compile(r"\.(a1|a2|b1|b2)\.weight$"), "GLoRA"),
    (re.compile(r"\.oft_|\.oft_blocks$|\.oft_diag$"), "OFT"),
    (re.compile(r"\.boft_"), "BOFT"),
    (re.compile(r"\.(w_norm|b_norm)$"), "norm fine-tune (LyCORIS w_norm / b_norm)"),
)


def unsupported_kind(key: str) -> str | None:
    """The adapter kind a tensor name belongs to when it is a known kind MoLE cannot mix (LoHa, LoKr, DoRA, ...)."""
    for pattern, kind in _UNSUPPORTED:
        if pattern.search(key):
            return kind
    return None


def lora_pair(down: torch.Tensor, up: torch.Tensor, alpha: float, source: str, key: str) -> LoraPair:
    try:
        return LoraPair(down, up, alpha)
    except ValueError as exc:
        raise ExpertLoadError(f"{source}: layer {key!r}: {exc}") from None


def check_pairs(downs: Mapping, ups: Mapping, source: str) -> None:
    missing_up = sorted(set(downs) - set(ups))
    missing_down = sorted(set(ups) - set(downs))
    if missing_up or missing_down:
        raise ExpertLoadError(
            f"{source}: incomplete LoRA pairs: layers with A/down but no B/up: {missing_up[:5]}, "
            f"with B/up but no A/down: {missing_down[:5]}"
        )
