"""One low-rank expert's weights for one layer: E(x) = B (A x) * alpha / rank."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LoraPair:
    """Low-rank factors of one expert at one layer.

    down: A, shape (rank, d_in)   (1x1 conv factors are stored squeezed)
          or (rank, c_in, kh, kw) for a LoCon expert on a spatial conv (kohya's lora_down, a conv like the base's)
    up:   B, shape (d_out, rank)   (always 1x1: kohya's lora_up)
    alpha: the LoRA alpha; the expert's output is scaled by alpha / rank.
    conv: the layer is a Conv2d (set automatically from 4-D factors); files written for it use 4-D factors.
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    conv: bool = False

    def __post_init__(self) -> None:
        self.conv = self.conv or self.down.ndim == 4
        if not (self.down.ndim == 4 and tuple(self.down.shape[2:]) != (1, 1)):  # a spatial down stays 4-D
            self.down = _squeeze_1x1(self.down, "down (lora_A / lora_down)")
        self.up = _squeeze_1x1(self.up, "up (lora_B / lora_up)")
        if self.down.ndim not in (2, 4) or self.up.ndim != 2:
            raise ValueError(
                f"LoRA factors must be 2-D, 1x1 conv or (for down) a k x k conv kernel; got down "
                f"{tuple(self.down.shape)}, up {tuple(self.up.shape)}"
            )
        if self.down.shape[0] != self.up.shape[1]:
            raise ValueError(
                f"LoRA rank mismatch: down has rank {self.down.shape[0]} (shape {tuple(self.down.shape)}) "
                f"but up has rank {self.up.shape[1]} (shape {tuple(self.up.shape)})"
            )
        self.alpha = float(self.alpha)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def kernel_size(self) -> tuple[int, int]:
        """(kh, kw) of the down factor: (1, 1) for Linear and 1x1 conv experts, e.g. (3, 3) for LoCon."""
        return tuple(self.down.shape[2:]) if self.down.ndim == 4 else (1, 1)

    @property
    def spatial(self) -> bool:
        return self.kernel_size != (1, 1)

    @property
    def in_features(self) -> int:
        return int(self.down.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def factors_for_file(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) as a LoRA file stores them: 4-D (r, d, 1, 1) / (o, r, 1, 1) for 1x1 convs."""
        if self.spatial:
            return self.down.contiguous(), self.up[:, :, None, None].contiguous()
        if self.conv:
            return self.down[:, :, None, None].contiguous(), self.up[:, :, None, None].contiguous()
        return self.down.contiguous(), self.up.contiguous()

    def delta_weight(self) -> torch.Tensor:
        """The dense update B A * scale, shape (d_out, d_in), or (d_out, c_in, kh, kw) for a spatial conv."""
        if self.spatial:
            return torch.einsum("or,rchw->ochw", self.up.float(), self.down.float()) * self.scale
        return (self.up.float() @ self.down.float()) * self.scale


def _squeeze_1x1(w: torch.Tensor, what: str) -> torch.Tensor:
    if w.ndim == 4:
        if w.shape[2:] != (1, 1):
            raise ValueError(
                f"{what} is a {tuple(w.shape[2:])} conv kernel; only the down factor (lora_down / lora_A) of a "
                "LoCon expert may be spatial, the up factor is 1x1"
            )
        return w[:, :, 0, 0]
    return w
