"""The paper's released MoLE files (JiePKU/MoLE): face + hand kohya LoRAs and the gate file of
WrapperLoRANetwork.save_weights, written here from the format's spec on tiny SD1.5 and SDXL (SGM names), loaded with
load_mole and compared with a literal implementation of the official SoftMoELayer; bad files are named."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import out_of
from mole import MoLEFileError, has_mole, load_expert, load_mole, mole_layers, set_fused
from mole.formats.kohya import kohya_flat_name
from mole.targets import TARGETS, detect_backbone, target_modules
from mole.tiny import tiny_unet, unet_inputs

SLOTS = ("face", "hand")


def write_official(unet, folder, ranks=(4, 6), alphas=(2.0, 12.0), seed=0, gate_dtype=torch.bfloat16):
    """face.safetensors, hand.safetensors (kohya LoRAs) and gate.safetensors (official gate keys) for `unet`."""
    g = torch.Generator().manual_seed(seed)
    paths = target_modules(unet, TARGETS[detect_backbone(unet)])
    loras = {name: {} for name in SLOTS}
    gate = {}
    for path in paths:
        m = unet.get_submodule(path)
        conv = isinstance(m, nn.Conv2d)
        d_in, d_out = (m.in_channels, m.out_channels) if conv else (m.in_features, m.out_features)
        flat = kohya_flat_name(path, unet)
        for name, r, a in zip(SLOTS, ranks, alphas):
            down = torch.randn(r, d_in, generator=g) * 0.2
            up = torch.randn(d_out, r, generator=g) * 0.2
            if conv:
                down, up = down[:, :, None, None], up[:, :, None, None]
            loras[name][f"lora_unet_{flat}.lora_down.weight"] = down.to(torch.float16)
            loras[name][f"lora_unet_{flat}.lora_up.weight"] = up.to(torch.float16)
            loras[name][f"lora_unet_{flat}.alpha"] = torch.tensor(a, dtype=torch.float16)
        pre = f"moe_lora_unet_{flat}.softmoe."
        gate[pre + "Phi_1.weight"] = torch.randn(2, d_in, generator=g) * 0.5
        gate[pre + "Phi_1.bias"] = torch.randn(2, generator=g)
        for name in SLOTS:
            gate[pre + f"{name}_scale.weight"] = torch.randn(1, d_out, generator=g) * 2
            gate[pre + f"{name}_scale.bias"] = torch.randn(1, generator=g)
    folder.mkdir(parents=True, exist_ok=True)
    for name in SLOTS:
        save_file(loras[name], str(folder / f"{name}.safetensors"))
    save_file({k: v.to(gate_dtype) for k, v in gate.items()}, str(folder / "gate.safetensors"))
    return folder


def official_reference(unet, folder):
    """The official SoftMoELayer, written out literally and hooked onto the plain modules of `unet`:
    results_i = f_i(X) * scale_i
    out_i = results_i * sigmoid(Phi_1(X))[..., i] * sigmoid(<i>_scale(mean_tokens(results_i)))
    F(X) + out_face + out_hand."""
    loras = {name: load_file(str(folder / f"{name}.safetensors")) for name in SLOTS}
    gate = load_file(str(folder / "gate.safetensors"))
    handles = []
    for path in target_modules(unet, TARGETS[detect_backbone(unet)]):
        flat = kohya_flat_name(path, unet)
        pre = f"moe_lora_unet_{flat}.softmoe."

        def hook(module, args, out, flat=flat, pre=pre):
            x = args[0]
            is_conv = x.ndim == 4
            if is_conv:
                b, d, h, w = x.shape
                x = x.permute(0, 2, 3, 1).reshape(b, -1, d)
            D = torch.sigmoid(x @ gate[pre + "Phi_1.weight"].float().t() + gate[pre + "Phi_1.bias"].float())
            total = 0
            for i, name in enumerate(SLOTS):
                sd = loras[name]
                down = sd[f"lora_unet_{flat}.lora_down.weight"].float().flatten(1)
                up = sd[f"lora_unet_{flat}.lora_up.weight"].float().flatten(1)
                scale = float(sd[f"lora_unet_{flat}.alpha"]) / down.shape[0]
                result = (x @ down.t()) @ up.t() * scale  # the expert on the un-gated input, times its scale
                pooled = result.mean(1, keepdim=True)  # AdaptiveAvgPool1d over tokens
                glob = torch.sigmoid(pooled @ gate[pre + f"{name}_scale.weight"].float().t()
                                     + gate[pre + f"{name}_scale.bias"].float())  # fmt: skip
                total = total + result * D[:, :, i : i + 1] * glob
            if is_conv:
                total = total.reshape(b, h, w, -1).permute(0, 3, 1, 2)
            return out + total

        handles.append(unet.get_submodule(path).register_forward_hook(hook))
    return handles


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_official_files_load_and_match_the_official_formula(tmp_path, kind):
    unet = tiny_unet(kind).eval()
    folder = write_official(unet, tmp_path / kind)
    if kind == "sdxl":  # kohya's SDXL names are in the SGM layout
        assert any(k.startswith("moe_lora_unet_input_blocks_") for k in load_file(str(folder / "gate.safetensors")))
    inputs = unet_inputs(unet, hw=(16, 12))
    reference_model = tiny_unet(kind).eval()
    official_reference(reference_model, folder)
    want = out_of(reference_model, inputs)
    base = out_of(unet, inputs)
    face = load_expert(folder / "face.safetensors", "face")
    hand = load_expert(folder / "hand.safetensors", "hand")
    load_mole(unet, folder / "gate.safetensors", experts=[hand, face])  # matched by name, not position
    state = unet.mole_state
    assert state.config.global_source.value == "expert_output" and state.config.gating.value == "both"
    assert len(mole_layers(unet)) == len(load_file(str(folder / "gate.safetensors"))) // 6
    got = out_of(unet, inputs)
    assert (want - base).abs().max() > 0.05
    torch.testing.assert_close(got, want, rtol=1e-4, atol=5e-5)
    set_fused(unet, False)
    torch.testing.assert_close(out_of(unet, inputs), want, rtol=1e-4, atol=5e-5)


def test_swapping_the_experts_changes_the_output(tmp_path):
    """The likely bug: matching experts by position. face=hand's file must not give the same model."""
    unet = tiny_unet("sd15").eval()
    folder = write_official(unet, tmp_path, ranks=(4, 4), alphas=(4.0, 4.0))
    inputs = unet_inputs(unet, hw=(16, 12))
    load_mole(unet, folder / "gate.safetensors", experts=_experts(folder))
    right = out_of(unet, inputs)
    other = tiny_unet("sd15").eval()
    swapped = [load_expert(folder / "hand.safetensors", "face"), load_expert(folder / "face.safetensors", "hand")]
    load_mole(other, folder / "gate.safetensors", experts=swapped)
    assert (out_of(other, inputs) - right).abs().max() > 1e-3


def _experts(folder):
    return [load_expert(folder / "face.safetensors", "face"), load_expert(folder / "hand.safetensors", "hand")]


def _rewrite(src, dst, edit):
    sd = load_file(str(src))
    edit(sd)
    save_file(sd, str(dst))
    return dst


def test_official_file_errors_name_the_key_or_expert(tmp_path):
    unet = tiny_unet("sd15").eval()
    folder = write_official(unet, tmp_path)
    gate = folder / "gate.safetensors"
    face, hand = _experts(folder)
    key = next(k for k in load_file(str(gate)) if k.endswith("attn2_to_k.softmoe.hand_scale.bias"))

    with pytest.raises(MoLEFileError, match=r"expert 'hand' is missing.*--expert hand=FILE"):
        load_mole(unet, gate, experts=[face])
    with pytest.raises(MoLEFileError, match=r"gates only.*--expert face=FILE"):
        load_mole(unet, gate)
    with pytest.raises(MoLEFileError, match=r"experts \['feet'\] were passed"):
        load_mole(unet, gate, experts=[face, hand, load_expert(folder / "hand.safetensors", "feet")])
    missing = _rewrite(gate, tmp_path / "missing.safetensors", lambda sd: sd.pop(key))
    with pytest.raises(MoLEFileError, match=rf"key '{key}' is missing"):
        load_mole(unet, missing, experts=[face, hand])
    bad = key.replace("hand_scale.bias", "gamma")
    extra = _rewrite(gate, tmp_path / "extra.safetensors", lambda sd: sd.update({bad: torch.zeros(1)}))
    with pytest.raises(MoLEFileError, match=rf"key '{bad}' is not an official MoLE gate key"):
        load_mole(unet, extra, experts=[face, hand])
    shaped = _rewrite(gate, tmp_path / "shape.safetensors", lambda sd: sd.update({key: torch.zeros(2)}))
    with pytest.raises(MoLEFileError, match=rf"key '{key}' has shape \(2,\).*needs \(1,\)"):
        load_mole(unet, shaped, experts=[face, hand])
    ghost = "moe_lora_unet_down_blocks_0_attentions_0_nothing_here.softmoe."

    def add_ghost(sd):
        for p in ("Phi_1.weight", "Phi_1.bias", "face_scale.weight", "face_scale.bias", "hand_scale.weight",
                  "hand_scale.bias"):  # fmt: skip
            sd[ghost + p] = torch.zeros(1)

    unknown = _rewrite(gate, tmp_path / "unknown.safetensors", add_ghost)
    with pytest.raises(MoLEFileError, match=r"nothing_here.*not a module"):
        load_mole(unet, unknown, experts=[face, hand])
    # an expert with a layer the gates do not cover, and one lacking a gated layer
    fewer = _rewrite(gate, tmp_path / "fewer.safetensors",
                     lambda sd: [sd.pop(k) for k in list(sd) if "attn2_to_k.softmoe" in k])  # fmt: skip
    with pytest.raises(MoLEFileError, match=r"expert 'face'.*attn2\.to_k.*no gates there.*attn2_to_k\.softmoe"):
        load_mole(unet, fewer, experts=[face, hand])
    thin = _rewrite(folder / "hand.safetensors", tmp_path / "thin.safetensors",
                    lambda sd: [sd.pop(k) for k in list(sd) if "attn2_to_k." in k])  # fmt: skip
    with pytest.raises(MoLEFileError, match=r"gates for '.*attn2\.to_k'.*expert 'hand'.*no weights there"):
        load_mole(unet, gate, experts=[face, load_expert(thin, "hand")])
    assert not has_mole(unet)  # nothing was changed by any refusal


def _same_file(a, b):
    from safetensors import safe_open

    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        assert fa.metadata() == fb.metadata()
        assert sorted(fa.keys()) == sorted(fb.keys())
        for k in fa.keys():
            ta, tb = fa.get_tensor(k), fb.get_tensor(k)
            assert ta.dtype == tb.dtype and ta.shape == tb.shape and torch.equal(ta, tb), k


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_convert_round_trip_is_exact(tmp_path, kind):
    from mole.convert import mole_to_official, official_to_mole

    unet = tiny_unet(kind).eval()
    folder = write_official(unet, tmp_path / "official")
    save_file(load_file(str(folder / "face.safetensors")), str(folder / "face.safetensors"),
              metadata={"ss_network_dim": "4", "ss_network_alpha": "2.0"})  # kohya files carry metadata  # fmt: skip
    files = {"face": folder / "face.safetensors", "hand": folder / "hand.safetensors"}
    one = official_to_mole(unet, folder / "gate.safetensors", files, tmp_path / "mole.safetensors", base_model=kind)
    assert not has_mole(unet)  # left as given
    inputs = unet_inputs(unet, hw=(16, 12))
    direct = tiny_unet(kind).eval()
    load_mole(direct, folder / "gate.safetensors", experts=_experts(folder))
    load_mole(unet, one)  # our file: manifest, experts embedded
    torch.testing.assert_close(out_of(unet, inputs), out_of(direct, inputs), rtol=0, atol=0)
    with pytest.raises(MoLEFileError, match="exists; pass --overwrite"):
        official_to_mole(unet, folder / "gate.safetensors", files, one)
    back = mole_to_official(one, tmp_path / "back")
    assert {p.name for p in back.values()} == {"face.safetensors", "hand.safetensors", "gate.safetensors"}
    for name in ("face", "hand", "gate"):
        _same_file(folder / f"{name}.safetensors", back[name])
    with pytest.raises(MoLEFileError, match="exist; pass --overwrite"):
        mole_to_official(one, tmp_path / "back")


def test_a_model_trained_here_converts_to_the_official_layout(tmp_path):
    from mole import inject_mole, remove_mole, save_mole
    from mole.config import MoLEConfig
    from mole.convert import mole_to_official
    from mole.tiny import random_expert

    unet = tiny_unet("sdxl").eval()
    experts = [random_expert(unet, "face", seed=1, std=0.2), random_expert(unet, "hand", seed=2, rank=6, std=0.2)]
    inject_mole(unet, experts, MoLEConfig(gating="both", global_source="expert_output"))
    with torch.no_grad():
        for layer in mole_layers(unet).values():
            for p in layer.gates.parameters():
                p.normal_()
    ours = save_mole(unet, tmp_path / "mole.safetensors")
    inputs = unet_inputs(unet, hw=(16, 12))
    want = out_of(unet, inputs)
    remove_mole(unet)
    with pytest.raises(MoLEFileError, match="needs the base model"):
        mole_to_official(ours, tmp_path / "official")
    files = mole_to_official(ours, tmp_path / "official", model=unet)
    assert any(k.startswith("moe_lora_unet_input_blocks_") for k in load_file(str(files["gate"])))
    load_mole(unet, files["gate"], experts=[load_expert(files["face"], "face"), load_expert(files["hand"], "hand")])
    torch.testing.assert_close(out_of(unet, inputs), want, rtol=1e-5, atol=1e-6)


def test_cli_generates_inspects_and_converts_with_the_papers_files(tmp_path, tiny_sd15_dir):
    import json

    from mole.cli import main
    from mole.inference.pipeline import load_pipeline

    unet = load_pipeline(tiny_sd15_dir, device="cpu").denoiser
    folder = write_official(unet, tmp_path / "official")
    experts = ["--expert", f"face={folder / 'face.safetensors'}", "--expert", f"hand={folder / 'hand.safetensors'}"]
    common = ["--base", str(tiny_sd15_dir), "--mole", str(folder / "gate.safetensors"), *experts, "--prompt",
              "a close-up photo of a face", "--steps", "2", "--device", "cpu"]  # fmt: skip
    assert main(["generate", *common, "--out", str(tmp_path / "gen"), "--compare", "--experts", "face=1.0"]) == 0
    index = json.loads((tmp_path / "gen" / "index.json").read_text())
    assert {i["mode"] for i in index["images"]} == {"none", "fixed", "mole"}
    assert main(["inspect", *common, "--out", str(tmp_path / "ins")]) == 0
    assert main(["generate", *common, "--out", str(tmp_path / "preset"), "--preset", "official"]) == 0
    index = json.loads((tmp_path / "preset" / "index.json").read_text())
    image = index["images"][0]
    assert image["prompt"] == "a close-up photo of a face best quality, 8K" and image["steps"] == 2  # explicit wins
    assert image["negative_prompt"] == " poor quality, unclear hand, bad face "
    assert index["options"]["scheduler_config"]["steps_offset"] == 0
    # a missing expert is refused with the flag to add
    assert main(["generate", *common[:4], *experts[:2], *common[8:], "--out", str(tmp_path / "x")]) == 2
    out = tmp_path / "mole.safetensors"
    assert main(["convert", "--base", str(tiny_sd15_dir), "--mole", str(folder / "gate.safetensors"), *experts,
                 "--out", str(out)]) == 0  # fmt: skip
    assert main(["info", str(out)]) == 0
    assert main(["convert", "--mole", str(out), "--out", str(tmp_path / "back")]) == 0
    _same_file(folder / "gate.safetensors", tmp_path / "back" / "gate.safetensors")
    assert main(["convert", "--mole", str(out), "--out", str(tmp_path / "back")]) == 2  # no silent overwrite
