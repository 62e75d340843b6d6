"""The shared LoRA InstructMoLE trains jointly with its experts (official: rank 256, alpha 256, peft's "gaussian"
init A ~ N(0, 1/r^2), B = 0) on the attention, modulation and first feed-forward layers.

Added with forward hooks (y = F(x) + alpha/r * B A x), so the base modules stay in place and remove() restores them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class LowRank(nn.Module):
    def __init__(self, d_in: int, d_out: int, rank: int, generator: torch.Generator) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.randn(rank, d_in, generator=generator) / rank)
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.lora_A.to(x.dtype).t()) @ self.lora_B.to(x.dtype).t()


class SharedLoRA(nn.Module):
    def __init__(self, transformer: nn.Module, paths: Sequence[str], rank: int, alpha: float | None = None,
                 seed: int = 0) -> None:  # fmt: skip
        super().__init__()
        if not paths:
            raise ValueError(f"the shared LoRA selects no layer of {type(transformer).__name__}; set "
                             "instruct.shared_targets or instruct.shared_rank=0")  # fmt: skip
        g = torch.Generator().manual_seed(seed)
        self.paths = list(paths)
        self.rank, self.scale = rank, float(alpha if alpha is not None else rank) / rank
        self.loras = nn.ModuleList()
        self._handles = []
        for path in self.paths:
            m = transformer.get_submodule(path)
            base = getattr(m, "base", m)  # a MoLE layer's own base
            if not isinstance(base, nn.Linear):
                raise ValueError(f"shared LoRA target {path!r} is a {type(base).__name__}, not a Linear")
            lora = LowRank(base.in_features, base.out_features, rank, g).to(base.weight.device)
            self.loras.append(lora)
            self._handles.append(m.register_forward_hook(self._hook(lora)))

    def _hook(self, lora: LowRank):
        def add(module, args, output):
            return output + lora(args[0]) * self.scale

        return add

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
