"""A file naming a layer the model lacks is one line, never a silent drop (issue 21, items 7 and 8): a MoLE file, a
LoRA expert, a gate file or the paper's files whose weights name a module path the base model does not have stop
the command (exit 2) with one line naming the path, the nearest paths the model has and the fix (another base
model, or a damaged file), before anything is written. Before this, a MoLE file's expert tensors at a layer its
manifest does not list were dropped without a word (`mole generate`, `--experts`, `mole bake`, `mole convert`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mole.cli import main
from mole.mole_tiny import ASSETS

needs_tiny = pytest.mark.skipif(not (ASSETS / "mole.safetensors").is_file(), reason="mole-tiny not built")
LAYER = "down_blocks.1.attentions.0.proj_in"  # a layer mole-tiny's face and hand experts both cover
GHOST = "down_blocks.1.attentions.0.proj_inn"  # one letter off: the model has no such module


def _tampered(tmp: Path, prefixes: tuple[str, ...], in_manifest: bool = False) -> Path:
    """mole-tiny's MoLE file with the tensors under each prefix (e.g. experts.face.) at LAYER moved to GHOST."""
    with safe_open(str(ASSETS / "mole.safetensors"), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    for key in list(tensors):
        if any(key.startswith(f"{p}{LAYER}.") for p in prefixes):
            tensors[key.replace(LAYER, GHOST)] = tensors.pop(key)
    if in_manifest:
        manifest = json.loads(meta["mole_manifest"])
        manifest["layers"] = [GHOST if p == LAYER else p for p in manifest["layers"]]
        meta["mole_manifest"] = json.dumps(manifest)
    path = tmp / "tampered.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return path


def _one_error(caplog) -> str:
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1, errors
    return errors[0]


def _names_ghost(line: str, nearest: str = LAYER) -> None:
    assert f"'{GHOST}'" in line, line
    assert f"nearest: {nearest}" in line, line
    assert "another base model" in line, line  # the fix
    assert "\n" not in line and "has no attribute" not in line, line


def _argv(command: str, mole: Path, tmp: Path) -> list[str]:
    out = str(tmp / "out")
    sampling = ["--base", "mole-tiny", "--mole", str(mole), "--prompt", "a face", "--steps", "1", "--out", out]
    baking = ["--weights", "face=1", "--out", f"{out}.safetensors"]
    return {
        "generate": ["generate", *sampling],
        "generate-fixed": ["generate", *sampling, "--experts", "face=1"],
        "inspect": ["inspect", *sampling],
        "bake": ["bake", "--mole", str(mole), "--base", "mole-tiny", *baking],
        "bake-no-base": ["bake", "--mole", str(mole), *baking],
    }[command]


@needs_tiny
@pytest.mark.parametrize("command", ["generate", "generate-fixed", "inspect", "bake", "bake-no-base"])
def test_expert_weights_at_a_layer_the_model_lacks_are_an_error_not_dropped(command, tmp_path, caplog):
    """The face expert's tensors at one layer moved to a path mole-tiny lacks (the manifest unchanged): this loaded,
    silently without that layer (exit 0, the images drawn, a baked LoRA one layer short)."""
    mole = _tampered(tmp_path, ("experts.face.",))
    assert main(_argv(command, mole, tmp_path)) == 2
    _names_ghost(_one_error(caplog))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.safetensors").exists()  # nothing written


@needs_tiny
@pytest.mark.parametrize("what", ["experts", "gates"])
def test_a_layer_listed_in_the_manifest_that_the_model_lacks_names_the_nearest(what, tmp_path, caplog):
    """The layer moved everywhere (experts, gates and the manifest's layer list), or only the gates moved."""
    if what == "experts":
        mole = _tampered(tmp_path, ("experts.face.", "experts.hand.", "gates."), in_manifest=True)
    else:
        mole = _tampered(tmp_path, ("gates.",))
    assert main(_argv("generate", mole, tmp_path)) == 2
    _names_ghost(_one_error(caplog))
    assert not (tmp_path / "out").exists()


@needs_tiny
def test_a_lora_expert_with_a_layer_the_model_lacks_names_the_nearest(tmp_path, caplog):
    with safe_open(str(ASSETS / "mole.safetensors"), "pt") as f:
        face = {k[len("experts.face.") :]: f.get_tensor(k) for k in f.keys() if k.startswith("experts.face.")}
    lora = {k.replace(LAYER, GHOST): v for k, v in face.items()}  # peft layout: <path>.lora_A / lora_B / alpha
    lora = {(k + ".weight" if k.endswith(("lora_A", "lora_B")) else k): v for k, v in lora.items()}
    save_file(lora, str(tmp_path / "face.safetensors"))
    argv = _argv("generate", ASSETS / "mole.safetensors", tmp_path)
    assert main([*argv, "--expert", f"face={tmp_path / 'face.safetensors'}"]) == 2
    line = _one_error(caplog)
    _names_ghost(line)
    assert "expert 'face'" in line and "face.safetensors" in line, line


def _official(unet, folder: Path, layers: list[str]) -> Path:
    """The paper's three files (face / hand kohya LoRAs, the gate file) at `layers` of `unet`."""
    from mole.layers import layer_dims

    g = torch.Generator().manual_seed(0)
    loras, gate = {"face": {}, "hand": {}}, {}
    for path in layers:
        d_in, d_out = layer_dims(unet.get_submodule(path))
        conv = (1, 1) if isinstance(unet.get_submodule(path), torch.nn.Conv2d) else ()
        flat = path.replace(".", "_")
        for name in loras:
            loras[name][f"lora_unet_{flat}.lora_down.weight"] = torch.randn(2, d_in, *conv, generator=g)
            loras[name][f"lora_unet_{flat}.lora_up.weight"] = torch.randn(d_out, 2, *conv, generator=g)
            loras[name][f"lora_unet_{flat}.alpha"] = torch.tensor(2.0)
        pre = f"moe_lora_unet_{flat}.softmoe."
        gate[pre + "Phi_1.weight"], gate[pre + "Phi_1.bias"] = torch.randn(2, d_in, generator=g), torch.zeros(2)
        for name in loras:
            gate[pre + f"{name}_scale.weight"] = torch.randn(1, d_out, generator=g)
            gate[pre + f"{name}_scale.bias"] = torch.zeros(1)
    folder.mkdir(parents=True)
    for name, sd in loras.items():
        save_file(sd, str(folder / f"{name}.safetensors"))
    save_file(gate, str(folder / "gate.safetensors"))
    return folder


@needs_tiny
def test_the_papers_files_with_a_layer_the_model_lacks_name_the_nearest(tmp_path, caplog):
    """`mole convert` of the paper's files whose gate file names a layer the base lacks; and a mole file converted
    from them whose expert tensors were moved to such a layer, converted back (no base: the file's own layers)."""
    from mole.inference.pipeline import load_pipeline

    unet = load_pipeline("mole-tiny", device="cpu").denoiser
    attn = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    folder = _official(unet, tmp_path / "paper", [LAYER, f"{attn}.to_k"])
    gate = load_file(str(folder / "gate.safetensors"))
    flat, ghost = LAYER.replace(".", "_"), GHOST.replace(".", "_")
    save_file({k.replace(flat, ghost): v for k, v in gate.items()}, str(tmp_path / "ghost-gate.safetensors"))
    experts = ["--expert", f"face={folder / 'face.safetensors'}", "--expert", f"hand={folder / 'hand.safetensors'}"]
    out = tmp_path / "one.safetensors"
    assert main(["convert", "--base", "mole-tiny", "--mole", str(tmp_path / "ghost-gate.safetensors"), *experts,
                 "--out", str(out)]) == 2  # fmt: skip
    line = _one_error(caplog)
    assert f"'{ghost}'" in line and f"nearest: {flat}" in line and "another base model" in line, line  # its names
    assert not out.exists()

    caplog.clear()
    assert main(["convert", "--base", "mole-tiny", "--mole", str(folder / "gate.safetensors"), *experts,
                 "--out", str(out)]) == 0  # fmt: skip
    caplog.clear()
    with safe_open(str(out), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    moved = {k.replace(LAYER, GHOST) if k.startswith(f"experts.face.{LAYER}.") else k: v for k, v in tensors.items()}
    save_file(moved, str(tmp_path / "moved.safetensors"), metadata=meta)
    assert main(["convert", "--mole", str(tmp_path / "moved.safetensors"), "--out", str(tmp_path / "back")]) == 2
    line = _one_error(caplog)
    assert f"'{GHOST}'" in line and f"nearest: {LAYER}" in line, line
    assert not (tmp_path / "back").exists()
