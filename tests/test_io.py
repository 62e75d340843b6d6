"""Saving and loading gates + manifest; every mismatch is an error naming what is wrong."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import out_of, two_experts
from mole import (
    MoLEConfig,
    MoLEFileError,
    inject_mole,
    load_mole,
    mole_layers,
    mole_state,
    read_mole_file,
    save_mole,
)
from mole.identity import structure_hash
from mole.tiny import random_expert, tiny_unet, unet_inputs


def trained_like(model, config=None, seed=0):
    """Inject two experts and move the gates away from their init, as training would."""
    inject_mole(model, two_experts(model, std=0.2), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in mole_layers(model).values():
            for p in layer.gates.parameters():
                p.add_(torch.randn(p.shape, generator=g))
    return model


def test_round_trip_into_a_fresh_model_with_embedded_experts(tmp_path, backbone):
    model, inputs = backbone
    trained_like(model)
    expected = out_of(model, inputs)
    path = save_mole(model, tmp_path / "mole.safetensors", base_model="tiny/base")
    manifest, tensors = read_mole_file(path)
    assert manifest["base_model"]["name"] == "tiny/base"
    assert [e["name"] for e in manifest["experts"]] == ["face", "hand"]
    assert manifest["config"]["gating"] == "both" and manifest["versions"]["torch"] == torch.__version__
    assert len(manifest["layers"]) == len(mole_layers(model))

    fresh = type(model).from_config(model.config).eval()
    fresh.load_state_dict(
        {k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k and ".gates." not in k}
    )
    load_mole(fresh, path)
    assert mole_state(fresh).expert_names == ["face", "hand"]
    assert torch.equal(out_of(fresh, inputs), expected)
    for path_, layer in mole_layers(fresh).items():
        for name, p in layer.gates.named_parameters():
            assert torch.equal(p, tensors[f"gates.{path_}.{name}"])


def test_gates_only_file_needs_the_experts(tmp_path, sd15):
    model, inputs = sd15
    trained_like(model)
    expected = out_of(model, inputs)
    path = save_mole(model, tmp_path / "gates.safetensors", include_experts=False)
    with safe_open(str(path), "pt") as f:
        assert not any(k.startswith("experts.") for k in f.keys())
    fresh = tiny_unet("sd15").eval()
    with pytest.raises(MoLEFileError, match=r"expert 'face' is missing.*load_expert"):
        load_mole(fresh, path)
    assert not mole_layers(fresh)
    load_mole(fresh, path, experts=two_experts(fresh, std=0.2))
    assert torch.equal(out_of(fresh, inputs), expected)


def test_a_different_expert_under_the_same_name_is_refused(tmp_path, sd15):
    model, _ = sd15
    trained_like(model)
    path = save_mole(model, tmp_path / "gates.safetensors", include_experts=False)
    fresh = tiny_unet("sd15").eval()
    wrong = [random_expert(fresh, "face", seed=99), random_expert(fresh, "hand", seed=2, std=0.1)]
    with pytest.raises(MoLEFileError, match=r"expert 'face' passed from random:99 differs"):
        load_mole(fresh, path, experts=wrong)


def test_loading_into_an_injected_model_maps_experts_by_name(tmp_path, sd15):
    model, inputs = sd15
    trained_like(model)
    expected = out_of(model, inputs)
    path = save_mole(model, tmp_path / "m.safetensors")
    fresh = tiny_unet("sd15").eval()
    face, hand = two_experts(fresh, std=0.2)
    inject_mole(fresh, [hand, face])  # other order: rows must follow the names, not positions
    assert not torch.allclose(out_of(fresh, inputs), expected)
    load_mole(fresh, path)
    torch.testing.assert_close(out_of(fresh, inputs), expected, rtol=1e-5, atol=1e-5)
    other = tiny_unet("sd15").eval()
    inject_mole(other, [random_expert(other, "face", seed=42), hand])
    with pytest.raises(MoLEFileError, match=r"expert 'face' in the model differs"):
        load_mole(other, path)


def test_wrong_architecture_names_both_models(tmp_path, sd15):
    model, _ = sd15
    trained_like(model)
    path = save_mole(model, tmp_path / "m.safetensors", base_model="runwayml/stable-diffusion-v1-5")
    other = tiny_unet("sd21").eval()
    with pytest.raises(MoLEFileError, match=r"'runwayml/stable-diffusion-v1-5'.*sd15.*different architecture"):
        load_mole(other, path)


def test_same_architecture_other_weights_is_refused_unless_asked(tmp_path, sd15):
    model, inputs = sd15
    trained_like(model)
    path = save_mole(model, tmp_path / "m.safetensors", base_model="base-a")
    other = tiny_unet("sd15", seed=1).eval()
    assert structure_hash(other) == structure_hash(model)
    with pytest.raises(MoLEFileError, match=r"'base-a'.*weights.*differ.*--no-strict-base"):
        load_mole(other, path)
    load_mole(other, path, strict_base=False)
    assert len(mole_layers(other)) == len(mole_layers(model))


def test_half_precision_copy_of_the_base_is_accepted(tmp_path, sd15):
    model, inputs = sd15
    trained_like(model)
    path = save_mole(model, tmp_path / "m.safetensors")
    half = tiny_unet("sd15").to(torch.bfloat16).eval()
    load_mole(half, path)
    assert next(iter(mole_layers(half).values())).lora_A.dtype == torch.bfloat16


def test_missing_and_misshapen_gate_keys_are_named(tmp_path, sd15):
    model, _ = sd15
    trained_like(model)
    path = save_mole(model, tmp_path / "m.safetensors")
    manifest, tensors = read_mole_file(path)
    meta = {"mole_manifest": json.dumps(manifest)}
    victim = sorted(k for k in tensors if k.startswith("gates."))[0]

    dropped = {k: v for k, v in tensors.items() if k != victim}
    save_file(dropped, str(tmp_path / "dropped.safetensors"), metadata=meta)
    fresh = tiny_unet("sd15").eval()
    with pytest.raises(MoLEFileError, match=rf"missing keys \['{victim}'\]"):
        load_mole(fresh, tmp_path / "dropped.safetensors")
    assert not mole_layers(fresh) and not hasattr(fresh, "mole_state")  # rolled back, no partial load

    bent = dict(tensors)
    bent[victim] = torch.zeros(3, 3)
    save_file(bent, str(tmp_path / "bent.safetensors"), metadata=meta)
    with pytest.raises(MoLEFileError, match=rf"{victim} has shape \(3, 3\), the model expects"):
        load_mole(fresh, tmp_path / "bent.safetensors")


def test_gating_mode_mismatch_and_non_mole_files(tmp_path, sd15):
    model, _ = sd15
    trained_like(model, MoLEConfig(gating="local"))
    path = save_mole(model, tmp_path / "m.safetensors")
    other = tiny_unet("sd15").eval()
    inject_mole(other, two_experts(other, std=0.2), MoLEConfig(gating="global"))
    with pytest.raises(MoLEFileError, match="gating=local/input, the model has global/input"):
        load_mole(other, path)
    save_file({"a": torch.zeros(1)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(MoLEFileError, match="not a MoLE file"):
        load_mole(tiny_unet("sd15"), tmp_path / "lora.safetensors")
    with pytest.raises(MoLEFileError, match="does not exist"):
        load_mole(tiny_unet("sd15"), tmp_path / "nothing.safetensors")


def test_local_save_pretrained_directory_path(tmp_path):
    """The path real users take: a base model from a local folder (as from the hub), MoLE weights beside it."""
    from diffusers import UNet2DConditionModel

    tiny_unet("sd15").save_pretrained(tmp_path / "base" / "unet")
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "base", subfolder="unet").eval()
    inputs = unet_inputs(unet, hw=(16, 12))
    trained_like(unet)
    expected = out_of(unet, inputs)
    path = save_mole(unet, tmp_path / "mole.safetensors")
    manifest, _ = read_mole_file(path)
    assert manifest["base_model"]["name"] == str(tmp_path / "base")
    again = UNet2DConditionModel.from_pretrained(tmp_path / "base", subfolder="unet").eval()
    load_mole(again, path)
    assert torch.equal(out_of(again, inputs), expected)


def test_save_refuses_other_suffixes_and_writes_atomically(tmp_path, sd15):
    model, _ = sd15
    trained_like(model)
    with pytest.raises(MoLEFileError, match=r"must end in \.safetensors"):
        save_mole(model, tmp_path / "m.pt")
    save_mole(model, tmp_path / "m.safetensors", dtype=torch.float16)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary file left behind
    _, tensors = read_mole_file(tmp_path / "m.safetensors")
    assert all(t.dtype == torch.float16 for k, t in tensors.items() if not k.endswith(".alpha"))


def test_base_check_covers_every_tensor_and_names_it(tmp_path, sd15):
    """A base that differs only in one up-block tensor (far from the first wrapped layers) is refused, named, and
    the message gives the CLI flag; the same base in fp16 rounding, or with strict_base=False, is accepted."""
    model, _ = sd15
    trained_like(model)
    path = save_mole(model, tmp_path / "mole.safetensors")
    state = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k and
             ".gates." not in k}  # fmt: skip
    name = next(k for k in sorted(state) if k.startswith("up_blocks.1.") and k.endswith("norm.weight"))
    other = tiny_unet("sd15").eval()
    changed = dict(state)
    changed[name] = state[name] + 0.5
    other.load_state_dict(changed)
    with pytest.raises(MoLEFileError, match=rf"differ in 1 of \d+ tensors: {name} \(compared.*--no-strict-base"):
        load_mole(other, path)
    load_mole(other, path, strict_base=False)  # a fine-tuned copy, on purpose
    rounded = tiny_unet("sd15").eval()
    rounded.load_state_dict({k: v.half().float() for k, v in state.items()})
    load_mole(rounded, path)  # fp16 rounding of the same base is the same base


def reinit_keeping_samples(model: torch.nn.Module, prefix: str, seed: int = 7) -> list[str]:
    """Re-initialise every parameter under `prefix` (reset_parameters, seeded) but put back the 4 values each
    tensor's weight_samples record reads, so only statistics over every value can tell; the changed names."""
    from mole.identity import SAMPLES_PER_TENSOR, spaced_indices

    torch.manual_seed(seed)
    block = model.get_submodule(prefix)
    before = {n: p.detach().clone() for n, p in block.named_parameters()}
    for m in block.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    with torch.no_grad():
        for n, p in block.named_parameters():
            flat, old = p.view(-1), before[n].view(-1)
            idx = spaced_indices(flat.numel(), SAMPLES_PER_TENSOR)
            flat[idx] = old[idx]
    return sorted(f"{prefix}.{n}" for n, p in block.named_parameters() if not torch.equal(p, before[n]))


def test_reinitialised_up_blocks_are_caught_by_statistics_of_every_tensor(tmp_path, sd15):
    """Item 7 of issue 21: a base whose up_blocks were re-initialised drew noise through the strict check. Only
    4 values per tensor were compared; they are kept equal here, so only statistics of every value see it."""
    from mole.identity import STAT_FIELDS, tensor_stats

    model, _ = sd15
    trained_like(model)
    path = save_mole(model, tmp_path / "mole.safetensors")
    manifest, _ = read_mole_file(path)
    assert manifest["base_model"]["tensor_stats"]["fields"] == list(STAT_FIELDS)
    other = tiny_unet("sd15").eval()
    other.load_state_dict(model_base_state(model))
    changed = reinit_keeping_samples(other, "up_blocks")
    assert len(changed) > 10
    with pytest.raises(MoLEFileError) as err:
        load_mole(other, path)
    msg = str(err.value)
    assert "\n" not in msg and "--no-strict-base" in msg and "Load the right base model" in msg
    count = int(msg.split("differ in ")[1].split(" of ")[0])
    assert count == len(changed)  # every re-initialised tensor, nothing else
    listed = msg.split("tensors: ")[1].split(" and ")[0].split(", ")
    assert listed == changed[:3] and f"and {count - 3} more" in msg
    assert not mole_layers(other)
    # a single attention re-initialised the same way is caught as well, and only its tensors are named
    one = tiny_unet("sd15").eval()
    one.load_state_dict(model_base_state(model))
    changed = reinit_keeping_samples(one, "down_blocks.0.attentions.0.transformer_blocks.0.attn1")
    with pytest.raises(MoLEFileError, match=rf"differ in {len(changed)} of \d+ tensors: {changed[0]}"):
        load_mole(one, path)
    # the same weights in bf16 (rounding, not a different base) give the same statistics within the tolerance
    same = tiny_unet("sd15").eval()
    same.load_state_dict(model_base_state(model))
    load_mole(same.to(torch.bfloat16), path)
    stats = tensor_stats(model)
    assert stats.shape == (len(model_base_state(model)), len(STAT_FIELDS)) and torch.isfinite(stats).all()


def test_a_file_without_the_statistics_still_loads_with_a_note(tmp_path, sd15, caplog):
    model, _ = sd15
    trained_like(model)
    path = save_mole(model, tmp_path / "mole.safetensors")
    manifest, tensors = read_mole_file(path)
    for drop, note in ((("tensor_stats",), "compared 4 samples of each tensor"),
                       (("tensor_stats", "weight_samples"), "cannot see a change elsewhere")):  # fmt: skip
        old = json.loads(json.dumps(manifest))
        for key in drop:
            del old["base_model"][key]
        save_file(tensors, str(tmp_path / "old.safetensors"), metadata={"mole_manifest": json.dumps(old)})
        fresh = tiny_unet("sd15").eval()
        fresh.load_state_dict(model_base_state(model))
        caplog.clear()
        with caplog.at_level("INFO", logger="mole"):
            load_mole(fresh, tmp_path / "old.safetensors")
        assert len(mole_layers(fresh)) == len(mole_layers(model))
        assert any(note in r.getMessage() and "save the file again" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gates_are_refused_by_key(tmp_path, sd15, bad):
    model, _ = sd15
    trained_like(model)
    path = save_mole(model, tmp_path / "mole.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    key = sorted(k for k in tensors if k.startswith("gates."))[3]
    tensors[key].view(-1)[0] = bad
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    fresh = tiny_unet("sd15").eval()
    fresh.load_state_dict(model_base_state(model))
    with pytest.raises(MoLEFileError, match=rf"{key} holds 1 NaN/Inf"):
        load_mole(fresh, tmp_path / "bad.safetensors")
    assert not mole_layers(fresh)  # nothing half-loaded


def model_base_state(model):
    return {k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k and
            ".gates." not in k}  # fmt: skip


def test_weight_samples_reach_the_last_element_of_tensors_past_2_24():
    """A float32 linspace rounds numel - 1 up past the end for SD1.5's 29,491,200-element conv (saving a real SD1.5
    MoLE file crashed); the positions are clamped to the last element and are otherwise those of the old code, so
    files written before keep their fingerprints."""
    from torch import nn

    from mole.identity import spaced_indices, weight_samples

    numel = 29_491_200
    old = torch.linspace(0, numel - 1, 4).long()
    assert old[-1] == numel  # the float32 rounding this guards against
    w = torch.zeros(numel)
    w[old[:-1]] = torch.tensor([1.0, 2.0, 3.0])
    w[-1] = 4.0
    module = nn.Module()
    module.w = nn.Parameter(w, requires_grad=False)
    assert weight_samples(module).tolist() == [[1.0, 2.0, 3.0, 4.0]]
    for n in [1, 2, 3, 7, 10, 1000, 65536, 4_194_304, 16_777_215]:
        for count in (4, 16):
            assert spaced_indices(n, count).tolist() == torch.linspace(0, n - 1, count).long().tolist(), (n, count)


def test_replace_swaps_the_experts_and_a_failed_replace_keeps_the_model_as_it_was(tmp_path, sd15):
    model, inputs = sd15
    trained_like(model)
    first = save_mole(model, tmp_path / "first.safetensors")
    expected = out_of(model, inputs)
    other = tiny_unet("sd15").eval()  # same architecture, other weights: another base
    with torch.no_grad():
        other.conv_in.weight.add_(1.0)
    inject_mole(other, [random_expert(other, "feet", rank=2, seed=5)])
    second = save_mole(other, tmp_path / "second.safetensors")
    with pytest.raises(MoLEFileError, match="was injected with"):  # without replace: the model's experts stay
        load_mole(model, tmp_path / "second.safetensors", strict_base=False)
    with pytest.raises(MoLEFileError, match="weights of .* differ"):  # the base check fails before any change
        load_mole(model, second, replace=True)
    assert mole_state(model).expert_names == ["face", "hand"]
    assert torch.equal(out_of(model, inputs), expected)
    load_mole(model, second, replace=True, strict_base=False)
    assert mole_state(model).expert_names == ["feet"]
    load_mole(model, first, replace=True)
    assert torch.equal(out_of(model, inputs), expected)


def test_gates_false_loads_the_experts_at_weight_one_without_gates(tmp_path, sd15):
    model, inputs = sd15
    trained_like(model)
    path = save_mole(model, tmp_path / "mole.safetensors")
    plain = tiny_unet("sd15").eval()
    base = out_of(plain, inputs)
    load_mole(plain, path, gates=False)
    state = mole_state(plain)
    assert state.config.gating.value == "none" and state.expert_names == ["face", "hand"]
    fixed = out_of(plain, inputs)
    assert not torch.allclose(fixed, base)
    reference = tiny_unet("sd15").eval()  # the same experts injected by hand without gates give the same output
    inject_mole(reference, two_experts(reference, std=0.2), MoLEConfig(gating="none"))
    assert torch.allclose(out_of(reference, inputs), fixed, atol=1e-6)
