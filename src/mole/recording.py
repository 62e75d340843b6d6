"""Record what the gates do: per denoising step, per layer, the global gates and the local score maps.

with record_gates(unet, latent_hw=(64, 64)) as rec:
    pipe(prompt)                       # every UNet call is one step
rec.mean_global()                      # (steps, b, e): the paper's Fig. 7 curves
rec.local_map(step=10, path=...)       # (b, e, h, w) local scores on the latent grid
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .inject import mole_layers, mole_state

_TEXT_TOKEN_LAYER = re.compile(r"(attn2\.to_[kv]|add_[kv]_proj)$")  # inputs are text tokens, not image tokens


@dataclass
class LayerRecord:
    """One layer call. global_gate (b, e) or None; local_gate (b, n, e) or None; grid (h, w) of the n tokens."""

    global_gate: torch.Tensor | None
    local_gate: torch.Tensor | None
    grid: tuple[int, int] | None


class GateRecorder:
    """Collects LayerRecords; `steps[t][layer_path]` is what layer `layer_path` did in model call t."""

    def __init__(
        self,
        expert_names: list[str],
        layer_paths: list[str],
        keep_local: bool,
        latent_hw: tuple[int, int] | None,
        local_steps: set[int] | None = None,
    ) -> None:
        self.expert_names = expert_names
        self.local_steps = local_steps  # keep local maps only at these step indices (None: every step)
        self.layer_paths = layer_paths  # model order; views list layers in this order, whatever the call order
        self.keep_local = keep_local
        self.latent_hw = latent_hw
        self.steps: list[dict[str, LayerRecord]] = []

    # called by the model's forward pre-hook: one model call is one denoising step
    def _new_step(self, module: nn.Module, args: tuple) -> None:
        self.steps.append({})

    def record(self, layer, local: torch.Tensor | None, glob: torch.Tensor | None, x: torch.Tensor) -> None:
        if not self.steps:  # layer called outside a model forward (e.g. on its own): open a step
            self.steps.append({})
        grid = None
        keep_local = self.keep_local and (self.local_steps is None or len(self.steps) - 1 in self.local_steps)
        if local is not None and keep_local:
            if layer.is_conv:
                grid = (int(x.shape[2]), int(x.shape[3]))
            elif not _TEXT_TOKEN_LAYER.search(layer.path):
                grid = token_grid(local.shape[1], self.latent_hw)
        rec = LayerRecord(
            global_gate=glob.detach().float().cpu() if glob is not None else None,
            local_gate=local.detach().float().cpu() if (local is not None and keep_local) else None,
            grid=grid,
        )
        step = self.steps[-1]
        key, k = layer.path, 2
        while key in step:  # a module called twice in one step keeps both calls
            key, k = f"{layer.path}#{k}", k + 1
        step[key] = rec

    # ------------------------------------------------------------------ views
    @property
    def num_steps(self) -> int:
        return len(self.steps)

    def global_gates(self) -> torch.Tensor:
        """(steps, layers, b, e) global gates of every layer that has them, layers in model order."""
        per_step = []
        for step in self.steps:
            gates = [step[p].global_gate for p in self.layer_paths if p in step and step[p].global_gate is not None]
            if not gates:
                raise ValueError("no global gates were recorded; the gating mode has none (gating='local')")
            per_step.append(torch.stack(gates))
        return torch.stack(per_step)

    def mean_global(self) -> torch.Tensor:
        """(steps, b, e): each expert's global gate averaged over layers, per step and sample (Fig. 7a/b)."""
        return self.global_gates().mean(1)

    def mean_local(self) -> torch.Tensor:
        """(steps, b, e): each expert's local score averaged over tokens and layers."""
        out = []
        for step in self.steps:
            vals = [r.local_gate.mean(1) for r in step.values() if r.local_gate is not None]
            if not vals:
                raise ValueError("no local gates were recorded (the file's gating is global: it has no local gates, "
                                 "or the local maps were not kept)")
            out.append(torch.stack(vals).mean(0))
        return torch.stack(out)

    def local_map(self, step: int, path: str) -> torch.Tensor:
        """(b, e, h, w) local scores of one layer at one step, on that layer's token grid."""
        rec = self.steps[step].get(path)
        if rec is None or rec.local_gate is None:
            raise KeyError(f"no local gates recorded for layer {path!r} at step {step}")
        if rec.grid is None:
            raise ValueError(
                f"layer {path!r}: its {rec.local_gate.shape[1]} tokens have no known grid; pass latent_hw to "
                "record_gates, or pick an image-token layer"
            )
        b, n, e = rec.local_gate.shape
        h, w = rec.grid
        return rec.local_gate.transpose(1, 2).reshape(b, e, h, w)

    def to_dict(self) -> dict:
        """JSON-ready numbers: per step, per layer, the global gates (and mean local scores)."""
        return {
            "experts": self.expert_names,
            "steps": [
                {
                    path: {
                        "global": r.global_gate.tolist() if r.global_gate is not None else None,
                        "local_mean": r.local_gate.mean(1).tolist() if r.local_gate is not None else None,
                        "grid": list(r.grid) if r.grid else None,
                    }
                    for path, r in step.items()
                }
                for step in self.steps
            ],
        }


def token_grid(n: int, latent_hw: tuple[int, int] | None) -> tuple[int, int] | None:
    """The (h, w) grid of n image tokens at some power-of-two downsampling of the latent (None if unknown)."""
    if latent_hw is None:
        return None
    h, w = latent_hw
    for k in range(8):
        f = 2**k
        gh, gw = math.ceil(h / f), math.ceil(w / f)
        if gh * gw == n:
            return gh, gw
    return None


@contextmanager
def record_gates(
    model: nn.Module,
    keep_local: bool = True,
    latent_hw: tuple[int, int] | None = None,
    local_steps: set[int] | None = None,
) -> Iterator[GateRecorder]:
    """Record every MoLE layer's gates while the block runs; each call of `model` starts a new step.

    keep_local: keep the (b, n, e) local score maps (memory grows with steps x layers x tokens).
    latent_hw: the latent height and width, to lay linear layers' tokens out as maps (conv layers know theirs).
    local_steps: keep local maps only at these step indices (global gates are kept at every step).
    """
    layers = mole_layers(model)
    rec = GateRecorder(mole_state(model).expert_names, list(layers), keep_local, latent_hw, local_steps)
    handle = model.register_forward_pre_hook(rec._new_step)
    for layer in layers.values():
        layer.recorder = rec
    try:
        yield rec
    finally:
        handle.remove()
        for layer in layers.values():
            layer.recorder = None
