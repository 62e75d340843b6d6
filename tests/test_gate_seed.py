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


def test_mole_layer_gates_do_not_depend_on_global_rng():
    from mole import LoraPair, MoLEConfig, MoLELayer

    def layer(global_seed: int, path: str) -> MoLELayer:
        torch.manual_seed(global_seed)
        base = nn_linear()
        a, b = torch.ones(2, 8), torch.ones(6, 2)
        return MoLELayer(base, ["x", "y"], {"x": LoraPair(a, b, 2), "y": LoraPair(a, b, 2)}, MoLEConfig(), path=path)

    one, two, other = layer(1, "down.0"), layer(2, "down.0"), layer(1, "down.1")
    for (n, p1), (_, p2), (_, p3) in zip(one.gates.named_parameters(), two.gates.named_parameters(),
                                        other.gates.named_parameters()):
        assert torch.equal(p1, p2), n
        assert not torch.equal(p1, p3), n


def nn_linear():
    return torch.nn.Linear(8, 6)
