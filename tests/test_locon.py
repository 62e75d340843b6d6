"""kohya LoCon experts (3x3 conv LoRAs on resnets and down/upsamplers): fixed weights equal diffusers' LoRA loader,
gated 3x3 layers compute E_i(X * s_i) (not s_i * E_i(X)), fused == naive; unsupported adapter kinds are named."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from mole import ExpertLoadError, MoLEConfig, inject_mole, load_expert, mole_layers, set_fused
from mole.formats.kohya import diffusers_to_sgm, kohya_flat_name, sgm_to_diffusers
from mole.inference.pipeline import load_loras
from mole.layers import LoraPair, MoLELayer, SpatialMoLELayer, mole_layer_for
from mole.tiny import tiny_pipeline, tiny_unet, unet_inputs

# every layer a kohya LoCon network (conv_dim set) covers in a diffusers UNet
LOCON = re.compile(
    r"(resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)|samplers\.0\.conv|attentions\.\d+\."
    r"(proj_in|proj_out|transformer_blocks\.\d+\.(attn\d\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))))$"
)


def write_locon(unet, path, rank=4, alpha=2.0, seed=0, std=0.1):
    """A kohya-layout LoCon file: lora_down (r, c, kh, kw) like the base conv, lora_up (o, r, 1, 1), alpha."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in unet.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)) or not LOCON.search(name):
            continue
        flat = "lora_unet_" + kohya_flat_name(name, unet)
        if isinstance(m, nn.Conv2d):
            sd[f"{flat}.lora_down.weight"] = torch.randn(rank, m.in_channels, *m.kernel_size, generator=g) * std
            sd[f"{flat}.lora_up.weight"] = torch.randn(m.out_channels, rank, 1, 1, generator=g) * std
        else:
            sd[f"{flat}.lora_down.weight"] = torch.randn(rank, m.in_features, generator=g) * std
            sd[f"{flat}.lora_up.weight"] = torch.randn(m.out_features, rank, generator=g) * std
        sd[f"{flat}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(path))
    return sd


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_locon_at_fixed_weight_equals_diffusers_load_lora_weights(tmp_path, kind):
    file = tmp_path / "locon.safetensors"
    pipe = tiny_pipeline(kind)
    sd = write_locon(pipe.unet, file)
    assert any(v.shape[2:] == (3, 3) for v in sd.values() if v.ndim == 4)
    assert any("downsamplers" in k or "_op." in k for k in sd) and any("upsamplers" in k or "_conv." in k for k in sd)
    inputs = unet_inputs(pipe.unet, hw=(16, 12))
    with torch.no_grad():
        base = pipe.unet(**inputs).sample
    pipe.load_lora_weights(str(file), adapter_name="x")
    pipe.set_adapters(["x"], [1.0])
    with torch.no_grad():
        reference = pipe.unet(**inputs).sample
    ours = tiny_pipeline(kind)
    load_loras(ours, {"x": file})
    layers = mole_layers(ours.unet)
    assert len(layers) == len(sd) // 3
    assert sum(isinstance(m, SpatialMoLELayer) for m in layers.values()) == sum(
        1 for v in sd.values() if v.ndim == 4 and v.shape[2:] == (3, 3)
    )
    with torch.no_grad():
        got = ours.unet(**inputs).sample
    assert (reference - base).abs().max() > 0.1  # the LoCon layers change the output
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=2e-5)


def _spatial_layer(base, gating="both", source="input", ranks=(3, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    kh, kw = base.kernel_size
    experts = {
        name: LoraPair(torch.randn(r, base.in_channels, kh, kw, generator=g) * 0.3,
                       torch.randn(base.out_channels, r, 1, 1, generator=g) * 0.3, alpha=2.0 * (i + 1))
        for i, (name, r) in enumerate(zip(["face", "hand"], ranks))
    }  # fmt: skip
    layer = mole_layer_for(base, ["face", "hand"], experts, MoLEConfig(gating=gating, global_source=source))
    with torch.no_grad():
        for p in layer.gates.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return layer, experts


def literal(layer, experts, x, source, gate_output=False):
    """F(X) + sum_i g_i * E_i(X * s_i), written out with F.conv2d, one expert at a time.
    gate_output=True: the likely bug s_i * E_i(X) (right for pointwise layers only)."""
    b, c, h, w = x.shape
    base = layer.base
    gates = layer.gates
    tokens = x.flatten(2).transpose(1, 2)
    out = base(x)
    for i, name in enumerate(["face", "hand"]):
        pair = experts[name]
        down = pair.down
        up = pair.up[:, :, None, None]

        def expert(inp, down=down, up=up, pair=pair):
            mid = F.conv2d(inp, down, None, base.stride, base.padding, base.dilation)
            return F.conv2d(mid, up) * pair.alpha / pair.rank

        s = torch.sigmoid(tokens @ gates.local_weight[i] + gates.local_bias[i]).view(b, 1, h, w)
        if source == "input":
            g = torch.sigmoid(tokens.mean(1) @ gates.global_weight[i] + gates.global_bias[i])
        else:
            g = torch.sigmoid(expert(x).mean((2, 3)) @ gates.global_weight[i] + gates.global_bias[i])
        y = s * expert(x) if gate_output else expert(x * s)
        out = out + g[:, None, None, None] * y
    return out


@pytest.mark.parametrize("source", ["input", "expert_output"])
@pytest.mark.parametrize(
    "conv",
    [nn.Conv2d(6, 10, 3, padding=1), nn.Conv2d(6, 6, 3, stride=2, padding=1), nn.Conv2d(6, 8, (3, 1), padding=(2, 0),
                                                                                          dilation=(2, 1))],
)  # fmt: skip
def test_gated_3x3_conv_is_the_literal_formula(conv, source):
    torch.manual_seed(0)
    layer, experts = _spatial_layer(conv, source=source)
    assert isinstance(layer, SpatialMoLELayer)
    x = torch.randn(2, conv.in_channels, 10, 7)  # non-square
    want = literal(layer, experts, x, source)
    with torch.no_grad():
        fused = layer(x)
        layer.fused = False
        naive = layer(x)
    torch.testing.assert_close(naive, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused, want, rtol=1e-5, atol=1e-5)
    if conv.stride == (1, 1) and want.shape[-2:] == x.shape[-2:]:  # the likely bug, where it is computable
        assert (literal(layer, experts, x, source, gate_output=True) - want).abs().max() > 1e-3


@pytest.mark.parametrize("gating", ["local", "global", "both", "none"])
@pytest.mark.parametrize("ranks", [(3, 3), (2, 5)])  # equal ranks: one grouped conv; unequal: a loop
def test_spatial_fused_equals_naive(gating, ranks):
    torch.manual_seed(1)
    for source in ("input", "expert_output"):
        layer, _ = _spatial_layer(nn.Conv2d(4, 6, 3, padding=1), gating, source, ranks)
        x = torch.randn(3, 4, 6, 9)
        with torch.no_grad():
            fused = layer(x)
            layer.fused = False
            naive = layer(x)
        torch.testing.assert_close(fused, naive, rtol=1e-5, atol=1e-5)


def test_gated_locon_unet_fused_equals_naive(tmp_path):
    unet = tiny_unet("sd15").eval()
    write_locon(unet, tmp_path / "face.safetensors", seed=1)
    write_locon(unet, tmp_path / "hand.safetensors", seed=2, rank=6)
    experts = [load_expert(tmp_path / "face.safetensors", "face"), load_expert(tmp_path / "hand.safetensors", "hand")]
    inputs = unet_inputs(unet, hw=(16, 12))
    for source in ("input", "expert_output"):
        inject_mole(unet, experts, MoLEConfig(gating="both", global_source=source))
        assert any(isinstance(m, SpatialMoLELayer) for m in mole_layers(unet).values())
        with torch.no_grad():
            fused = unet(**inputs).sample
            set_fused(unet, False)
            naive = unet(**inputs).sample
        torch.testing.assert_close(fused, naive, rtol=1e-4, atol=1e-5)
        from mole import remove_mole

        remove_mole(unet)


def test_pointwise_and_spatial_layers_are_told_apart():
    g = torch.Generator().manual_seed(0)
    pair = LoraPair(torch.randn(2, 4, 3, 3, generator=g), torch.randn(4, 2, 1, 1, generator=g), 2.0)
    assert pair.spatial and pair.kernel_size == (3, 3) and pair.down.shape == (2, 4, 3, 3)
    assert isinstance(mole_layer_for(nn.Conv2d(4, 4, 3), ["face"], {"face": pair}, MoLEConfig()), SpatialMoLELayer)
    point = LoraPair(torch.randn(2, 4, 1, 1, generator=g), torch.randn(4, 2, 1, 1, generator=g), 2.0)
    assert type(mole_layer_for(nn.Conv2d(4, 4, 1), ["face"], {"face": point}, MoLEConfig())) is MoLELayer
    with pytest.raises(ValueError, match=r"\(1, 1\) down kernel but the base layer's kernel is \(3, 3\)"):
        mole_layer_for(nn.Conv2d(4, 4, 3), ["face"], {"face": point}, MoLEConfig())
    with pytest.raises(ValueError, match="up factor is 1x1"):
        LoraPair(torch.randn(2, 4, 3, 3), torch.randn(4, 2, 3, 3), 2.0)


@pytest.mark.parametrize(
    "key,value,kind",
    [
        ("lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a", torch.zeros(2, 4), "LoHa"),
        ("lora_unet_down_blocks_0_resnets_0_conv1.lokr_w1", torch.zeros(2, 2), "LoKr"),
        ("lora_unet_down_blocks_0_resnets_0_conv1.dora_scale", torch.zeros(1, 4), "DoRA"),
        ("lora_unet_down_blocks_0_resnets_0_conv1.lora_mid.weight", torch.zeros(2, 2, 3, 3), "lora_mid"),
        ("lora_unet_down_blocks_0_resnets_0_conv1.diff", torch.zeros(4, 4), "diff"),
    ],
)
def test_unsupported_kinds_name_file_key_and_kind(tmp_path, key, value, kind):
    file = tmp_path / "odd.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 2),
               key: value}, str(file))  # fmt: skip
    with pytest.raises(ExpertLoadError, match=rf"odd\.safetensors.*{re.escape(key)}.*{kind}"):
        load_expert(file, "face")


def test_bad_factor_shapes_are_expert_load_errors_naming_file_and_key(tmp_path):
    file = tmp_path / "bad.safetensors"
    save_file({"lora_unet_a_b.lora_down.weight": torch.zeros(2, 4, 3, 3),
               "lora_unet_a_b.lora_up.weight": torch.zeros(4, 2, 3, 3)}, str(file))  # fmt: skip
    with pytest.raises(ExpertLoadError, match=r"bad\.safetensors.*lora_unet_a_b.*up factor is 1x1"):
        load_expert(file, "face")
    assert issubclass(ExpertLoadError, ValueError)


def test_sgm_names_round_trip_on_resnets_samplers_and_attention():
    unet = tiny_unet("sdxl")
    seen = 0
    for name, m in unet.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and LOCON.search(name):
            sgm = diffusers_to_sgm(name, unet)
            assert sgm.startswith(("input_blocks_", "output_blocks_", "middle_block_")), sgm
            assert sgm_to_diffusers(sgm, unet.config.layers_per_block) == name.replace(".", "_")
            seen += 1
    assert seen > 30
    # real SDXL numbering (layers_per_block=2): the published kohya names
    assert sgm_to_diffusers("input_blocks_3_0_op", 2) == "down_blocks_0_downsamplers_0_conv"
    assert sgm_to_diffusers("output_blocks_2_2_conv", 2) == "up_blocks_0_upsamplers_0_conv"
    assert sgm_to_diffusers("output_blocks_8_0_skip_connection", 2) == "up_blocks_2_resnets_2_conv_shortcut"
    assert sgm_to_diffusers("middle_block_2_in_layers_2", 2) == "mid_block_resnets_1_conv1"
    assert sgm_to_diffusers("input_blocks_4_1_proj_in", 2) == "down_blocks_1_attentions_0_proj_in"
