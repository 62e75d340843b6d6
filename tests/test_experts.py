"""Loading experts from peft, diffusers and kohya files and from in-memory peft adapters; bad files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import out_of
from mole import (
    ExpertLoadError,
    KeyNaming,
    MoLEConfig,
    MoLEInjectError,
    expert_from_peft,
    inject_mole,
    load_expert,
    mole_layers,
    remove_mole,
)
from mole.formats.kohya import sgm_to_diffusers as _sgm_to_diffusers
from mole.tiny import random_expert, tiny_unet, unet_inputs

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


def open_gates(model):
    """Pin every gate at sigmoid(40) = 1 so MoLE reduces to base + sum of experts (what peft computes)."""
    with torch.no_grad():
        for layer in mole_layers(model).values():
            for name, p in layer.gates.named_parameters():
                p.fill_(40.0 if name.endswith("bias") else 0.0)


def peft_unet(adapters=(("face", 4, 8), ("hand", 6, 3))):
    unet = tiny_unet("sd15").eval()
    for name, r, alpha in adapters:
        unet.add_adapter(
            LoraConfig(r=r, lora_alpha=alpha, target_modules=PEFT_TARGETS, init_lora_weights=False), adapter_name=name
        )
    return unet


def test_in_memory_peft_adapters_match_peft_output():
    unet = peft_unet()
    inputs = unet_inputs(unet, hw=(16, 12))
    unet.set_adapters(["face", "hand"], weights=[1.0, 1.0])
    reference = out_of(unet, inputs)
    experts = [expert_from_peft(unet, "face"), expert_from_peft(unet, "hand")]
    assert experts[0].ranks == {4} and experts[1].ranks == {6}
    assert next(iter(experts[0].layers.values())).alpha == pytest.approx(8.0)
    plain = tiny_unet("sd15").eval()
    inject_mole(plain, experts)
    open_gates(plain)
    torch.testing.assert_close(out_of(plain, inputs), reference, rtol=1e-4, atol=1e-5)


def test_diffusers_lora_file_with_adapter_metadata(tmp_path):
    from diffusers import StableDiffusionPipeline

    unet = peft_unet((("face", 4, 8),))
    inputs = unet_inputs(unet, hw=(16, 12))
    reference = out_of(unet, inputs)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=get_peft_model_state_dict(unet, adapter_name="face"),
        unet_lora_adapter_metadata=unet.peft_config["face"].to_dict(),
    )
    expert = load_expert(tmp_path / "pytorch_lora_weights.safetensors", "face")
    assert expert.naming is KeyNaming.DOTTED and all(p.alpha == 8.0 for p in expert.layers.values())
    plain = tiny_unet("sd15").eval()
    inject_mole(plain, [expert])
    open_gates(plain)
    torch.testing.assert_close(out_of(plain, inputs), reference, rtol=1e-4, atol=1e-5)
    # the folder works too
    assert load_expert(tmp_path, "face").fingerprint() == expert.fingerprint()


def test_peft_save_pretrained_folder_with_alpha_pattern(tmp_path):
    unet = tiny_unet("sd15").eval()
    cfg = LoraConfig(
        r=4, lora_alpha=4, alpha_pattern={"to_k": 16}, target_modules=PEFT_TARGETS, init_lora_weights=False
    )
    model = get_peft_model(unet, cfg)
    inputs = unet_inputs(unet, hw=(16, 12))
    reference = out_of(model, inputs)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file()
    expert = load_expert(tmp_path, "face")
    alphas = {k.rsplit(".", 1)[-1]: p.alpha for k, p in expert.layers.items()}
    assert alphas["to_k"] == 16.0 and alphas["to_q"] == 4.0
    plain = tiny_unet("sd15").eval()
    inject_mole(plain, [expert])
    open_gates(plain)
    torch.testing.assert_close(out_of(plain, inputs), reference, rtol=1e-4, atol=1e-5)


def write_kohya(expert, path, text_encoder_keys=True):
    sd = {}
    for flat, pair in expert.layers.items():
        conv = flat.endswith(("proj_in", "proj_out"))
        down, up = (pair.down[:, :, None, None], pair.up[:, :, None, None]) if conv else (pair.down, pair.up)
        sd[f"lora_unet_{flat}.lora_down.weight"] = down.contiguous()
        sd[f"lora_unet_{flat}.lora_up.weight"] = up.contiguous()
        sd[f"lora_unet_{flat}.alpha"] = torch.tensor(pair.alpha)
    if text_encoder_keys:
        sd["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.zeros(4, 32)
        sd["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.zeros(32, 4)
    save_file(sd, str(path), metadata={"ss_network_module": "networks.lora"})


def test_kohya_file_import(tmp_path, sd15):
    model, inputs = sd15
    source = random_expert(model, "face", rank=4, alpha=1.0, seed=5, std=0.2, kohya=True)
    write_kohya(source, tmp_path / "face.safetensors")
    expert = load_expert(tmp_path / "face.safetensors", "face")
    assert expert.naming is KeyNaming.KOHYA
    assert len(expert.skipped) == 2 and expert.skipped[0].startswith("lora_te_")
    assert set(expert.layers) == set(source.layers)
    assert all(p.alpha == 1.0 and p.scale == 0.25 for p in expert.layers.values())
    inject_mole(model, [expert], MoLEConfig(gate_init="zero"))
    from_file = out_of(model, inputs)
    remove_mole(model)
    dotted = random_expert(model, "face", rank=4, alpha=1.0, seed=5, std=0.2)
    inject_mole(model, [dotted], MoLEConfig(gate_init="zero"))
    torch.testing.assert_close(out_of(model, inputs), from_file, rtol=0, atol=0)


@pytest.mark.parametrize(
    "sgm,diffusers",
    [
        (
            "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
            "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
        ),
        ("input_blocks_5_1_proj_in", "down_blocks_1_attentions_1_proj_in"),
        ("input_blocks_8_1_transformer_blocks_9_ff_net_2", "down_blocks_2_attentions_1_transformer_blocks_9_ff_net_2"),
        ("middle_block_1_transformer_blocks_3_attn2_to_k", "mid_block_attentions_0_transformer_blocks_3_attn2_to_k"),
        ("output_blocks_0_1_proj_out", "up_blocks_0_attentions_0_proj_out"),
        (
            "output_blocks_2_1_transformer_blocks_0_attn2_to_out_0",
            "up_blocks_0_attentions_2_transformer_blocks_0_attn2_to_out_0",
        ),
        ("output_blocks_5_1_proj_in", "up_blocks_1_attentions_2_proj_in"),
    ],
)
def test_sdxl_sgm_kohya_names_map_to_diffusers(sgm, diffusers):
    assert _sgm_to_diffusers(sgm, layers_per_block=2) == diffusers


def test_sdxl_kohya_file_with_sgm_names(tmp_path):
    model = tiny_unet("sdxl").eval()  # layers_per_block=1: down_blocks.1 holds input_blocks 3 (and 4: downsampler)
    source = random_expert(model, "hand", seed=7, std=0.2, kohya=True)
    renamed = {}
    for flat, pair in source.layers.items():
        flat = flat.replace("down_blocks_1_attentions_0_", "input_blocks_3_1_")
        flat = flat.replace("mid_block_attentions_0_", "middle_block_1_")
        flat = flat.replace("up_blocks_0_attentions_1_", "output_blocks_1_1_")
        renamed[flat] = pair
    source.layers = renamed
    assert any(k.startswith("input_blocks_3_1_") for k in renamed)
    write_kohya(source, tmp_path / "hand.safetensors", text_encoder_keys=False)
    inject_mole(model, [load_expert(tmp_path / "hand.safetensors", "hand")])
    assert "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k" in mole_layers(model)
    assert "up_blocks.0.attentions.1.proj_out" in mole_layers(model)


def test_missing_file_and_pickles_are_refused(tmp_path):
    with pytest.raises(ExpertLoadError, match=r"expert 'face'.*does not exist"):
        load_expert(tmp_path / "nope.safetensors", "face")
    (tmp_path / "face.ckpt").write_bytes(b"0")
    with pytest.raises(ExpertLoadError, match="not a .safetensors file"):
        load_expert(tmp_path / "face.ckpt", "face")
    with pytest.raises(ExpertLoadError, match="holds none of"):
        load_expert(tmp_path, "face")


def test_corrupt_and_non_lora_files_are_refused(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(ExpertLoadError, match=r"bad\.safetensors is not a readable safetensors file"):
        load_expert(bad, "face")
    weights = tmp_path / "unet.safetensors"
    save_file({"conv_in.weight": torch.zeros(4, 4, 3, 3)}, str(weights))
    with pytest.raises(ExpertLoadError, match=r"not a LoRA state dict.*conv_in\.weight"):
        load_expert(weights, "face")


def test_incomplete_pairs_and_odd_keys_are_named(tmp_path):
    half = tmp_path / "half.safetensors"
    save_file({"lora_unet_a_b.lora_down.weight": torch.zeros(2, 4)}, str(half))
    with pytest.raises(ExpertLoadError, match=r"incomplete LoRA pairs.*'a_b'"):
        load_expert(half, "face")
    loha = tmp_path / "loha.safetensors"
    save_file(
        {"lora_unet_a_b.hada_w1_a": torch.zeros(2, 4), "lora_unet_c.lora_down.weight": torch.zeros(2, 4)}, str(loha)
    )
    with pytest.raises(ExpertLoadError, match=r"lora_unet_a_b\.hada_w1_a.*LoHa"):
        load_expert(loha, "face")


def test_several_adapters_need_a_choice(sd15):
    unet = peft_unet()
    state = {k: v for k, v in unet.state_dict().items() if "lora_" in k}
    from mole import expert_from_state_dict

    with pytest.raises(ExpertLoadError, match=r"adapters \['face', 'hand'\]; pass adapter="):
        expert_from_state_dict(state, "face")
    hand = expert_from_state_dict(state, "hand", adapter="hand")
    assert hand.ranks == {6}


def test_dora_is_refused(tmp_path):
    save_file(
        {"x.lora_A.weight": torch.zeros(2, 4), "x.lora_B.weight": torch.zeros(4, 2)},
        str(tmp_path / "adapter_model.safetensors"),
    )
    (tmp_path / "adapter_config.json").write_text(json.dumps({"use_dora": True, "r": 2, "lora_alpha": 2}))
    with pytest.raises(ExpertLoadError, match="DoRA"):
        load_expert(tmp_path, "face")


def test_expert_for_another_base_is_refused_before_any_change(sd15):
    model, _ = sd15
    sd21_expert = random_expert(tiny_unet("sd21"), "face")  # cross-attention dim 48, not 32
    sd21_expert.layers = {k: v for k, v in sd21_expert.layers.items() if not k.endswith(("proj_in", "proj_out"))}
    with pytest.raises(MoLEInjectError, match=r"expert 'face' has shape \(in 48.*attn2\.to_k.*another base model"):
        inject_mole(model, [sd21_expert])
    assert not mole_layers(model) and all(p.requires_grad for p in model.parameters())


def test_bad_expert_names_are_refused(sd15):
    model, _ = sd15
    with pytest.raises(ExpertLoadError, match="expert name 'face.safetensors' is not valid"):
        random_expert(model, "face.safetensors")
