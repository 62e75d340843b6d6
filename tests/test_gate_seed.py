import torch

from mole.config import GateInit, Gating, GlobalSource
from mole.layers.gates import MoLEGates


def _gates(seed: int) -> MoLEGates:
    gating = next(g for g in Gating if g.uses_local and g.uses_global) if any(
        g.uses_local and g.uses_global for g in Gating) else list(Gating)[0]
    return MoLEGates(3, 8, 6, gating, list(GlobalSource)[0], GateInit.DEFAULT,
                     generator=torch.Generator().manual_seed(seed))


def test_gate_init_is_a_function_of_the_generator_not_global_state():
    torch.manual_seed(1)
    a = _gates(5)
    torch.manual_seed(2)
    b = _gates(5)
    c = _gates(6)
    for (na, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(pa, pb), na
        assert not torch.equal(pa, pc), na
        assert pa.abs().max() <= 1 / 8**0.5 + 1e-7
