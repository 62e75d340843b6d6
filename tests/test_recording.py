"""Gate recording: per step, per layer, global gates and local score maps on the right grids."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import two_experts
from mole import MoLEConfig, inject_mole, mole_layers, record_gates, set_fused
from mole.recording import token_grid


def run_steps(model, inputs, steps):
    with torch.no_grad():
        for t in range(steps):
            model(**{**inputs, "timestep": torch.tensor(900 - 100 * t)})


@pytest.mark.parametrize("fused", [True, False])
def test_records_every_step_and_every_layer(sd15, fused):
    model, inputs = sd15
    inject_mole(model, two_experts(model))
    set_fused(model, fused)
    with record_gates(model, latent_hw=(16, 12)) as rec:
        run_steps(model, inputs, 3)
    layers = list(mole_layers(model))
    assert rec.num_steps == 3
    assert all(set(step) == set(layers) for step in rec.steps) and rec.layer_paths == layers
    g = rec.global_gates()
    assert g.shape == (3, len(layers), 2, 2)  # steps, layers, batch, experts
    assert ((g > 0) & (g < 1)).all()
    assert rec.mean_global().shape == (3, 2, 2) and rec.mean_local().shape == (3, 2, 2)
    # recording stops with the block
    run_steps(model, inputs, 1)
    assert rec.num_steps == 3 and all(layer.recorder is None for layer in mole_layers(model).values())


def test_recorded_gates_are_the_ones_applied(sd15):
    model, inputs = sd15
    inject_mole(model, two_experts(model))
    path, layer = next(iter(mole_layers(model).items()))
    with record_gates(model, latent_hw=(16, 12)) as rec:
        run_steps(model, inputs, 1)
    # recompute the layer's gates from its input, captured with a hook
    seen = {}
    handle = layer.register_forward_hook(lambda m, a, o: seen.setdefault("x", a[0]))
    run_steps(model, inputs, 1)
    handle.remove()
    x = seen["x"].flatten(2).transpose(1, 2)  # proj_in is a conv: (b, c, h, w) -> (b, n, c)
    expected_local = torch.sigmoid(x @ layer.gates.local_weight.T + layer.gates.local_bias)
    expected_global = torch.sigmoid(x.mean(1) @ layer.gates.global_weight.T + layer.gates.global_bias)
    torch.testing.assert_close(rec.steps[0][path].local_gate, expected_local, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rec.steps[0][path].global_gate, expected_global, rtol=1e-5, atol=1e-6)


def test_local_maps_keep_non_square_grids(sd15):
    model, inputs = sd15
    inject_mole(model, two_experts(model))
    with record_gates(model, latent_hw=(16, 12)) as rec:
        run_steps(model, inputs, 1)
    conv = "down_blocks.0.attentions.0.proj_in"
    linear = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert rec.local_map(0, conv).shape == (2, 2, 16, 12)
    assert rec.local_map(0, linear).shape == (2, 2, 16, 12)
    assert rec.local_map(0, "mid_block.attentions.0.proj_in").shape == (2, 2, 8, 6)
    with pytest.raises(ValueError, match="no known grid"):
        rec.local_map(0, "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k")  # text tokens


def test_global_only_gating_records_no_local_maps(sd15):
    model, inputs = sd15
    inject_mole(model, two_experts(model), MoLEConfig(gating="global"))
    with record_gates(model) as rec:
        run_steps(model, inputs, 2)
    assert rec.global_gates().shape[0] == 2
    with pytest.raises(ValueError, match="no local gates"):
        rec.mean_local()


def test_to_dict_is_json(sd15):
    model, inputs = sd15
    inject_mole(model, two_experts(model))
    with record_gates(model, latent_hw=(16, 12)) as rec:
        run_steps(model, inputs, 2)
    data = json.loads(json.dumps(rec.to_dict()))
    assert data["experts"] == ["face", "hand"] and len(data["steps"]) == 2
    first = data["steps"][0]["down_blocks.0.attentions.0.proj_in"]
    assert len(first["global"]) == 2 and len(first["global"][0]) == 2 and first["grid"] == [16, 12]


def test_token_grid():
    assert token_grid(16 * 12, (16, 12)) == (16, 12)
    assert token_grid(4 * 3, (16, 12)) == (4, 3)
    assert token_grid(77, (16, 12)) is None
    assert token_grid(10, None) is None
