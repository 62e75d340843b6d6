"""InstructMoLE on Flux and Flux-Kontext: tiny pipelines built from configs, experts on the official targets,
conditions through the Kontext path, stage-4 training and generation."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image, ImageFilter

from conftest import FACES
from mole import mole_layers
from mole.instruct import InstructConfig, InstructMoLE, KontextConditions
from mole.targets import TARGETS, Backbone, detect_backbone, target_modules
from mole.tiny import tiny_flux, tiny_flux_pipeline

SMALL = dict(rank=4, shared_rank=4, resampler_dim=32, resampler_heads=2)


def flux_inputs(t, batch=2, hw=(4, 6), seed=0):
    from diffusers import FluxPipeline

    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(batch, 4, hw[0] * 2, hw[1] * 2, generator=g)
    return {
        "hidden_states": FluxPipeline._pack_latents(lat, batch, 4, hw[0] * 2, hw[1] * 2),
        "encoder_hidden_states": torch.randn(batch, 5, 32, generator=g),
        "pooled_projections": torch.randn(batch, 32, generator=g),
        "timestep": torch.full((batch,), 0.5),
        "guidance": torch.ones(batch),
        "img_ids": FluxPipeline._prepare_latent_image_ids(batch, *hw, "cpu", torch.float32),
        "txt_ids": torch.zeros(5, 3),
    }


def test_official_targets_are_the_57_flux_layers():
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        full = FluxTransformer2DModel()  # FLUX.1 [dev] / Kontext sizes
    assert detect_backbone(full) is Backbone.FLUX
    paths = target_modules(full, TARGETS[Backbone.FLUX])
    assert len(paths) == 57 and sum("single" in p for p in paths) == 38
    assert all(p.endswith("ff.net.2") or p.endswith("proj_out") for p in paths)
    assert not any("ff_context" in p for p in paths)


def test_router_uses_t5_states_and_the_clip_pooled_vector():
    t = tiny_flux().eval()
    im = InstructMoLE(t, InstructConfig(**SMALL), text_dim=32, total_steps=10)
    assert list(mole_layers(t)) == ["transformer_blocks.0.ff.net.2", "single_transformer_blocks.0.proj_out",
                                    "single_transformer_blocks.1.proj_out"]  # fmt: skip
    assert im.pooled_dim == 32 and im.router.signal_dim == 32
    inp = flux_inputs(t)
    with torch.no_grad():
        t(**inp)
        w = im.router.last_weights.clone()
        z = im.router.signal(inp["encoder_hidden_states"], None, inp["pooled_projections"])
        z0 = im.router.signal(inp["encoder_hidden_states"], None, None)
        torch.testing.assert_close(z - z0, inp["pooled_projections"])  # the pooled vector is added to the output
        t(**{**inp, "pooled_projections": inp["pooled_projections"] * 3})
        assert not torch.allclose(im.router.last_weights, w)
    assert w.shape == (3, 2, 8) and ((w > 0).sum(-1) == 4).all()
    shared = set(im.shared.paths)
    assert {"x_embedder", "transformer_blocks.0.attn.to_q", "transformer_blocks.0.norm1.linear",
            "single_transformer_blocks.1.norm.linear", "single_transformer_blocks.0.proj_mlp",
            "transformer_blocks.0.ff.net.0.proj"} <= shared  # fmt: skip
    assert not any("add_q_proj" in p or "ff_context" in p or "proj_out" in p for p in shared)


def test_kontext_conditions_are_extra_tokens_with_offset_ids():
    from diffusers import FluxPipeline

    t = tiny_flux().eval()
    InstructMoLE(t, InstructConfig(**SMALL), text_dim=32, total_steps=10)
    inp = flux_inputs(t)
    cond = torch.randn(2, 4, 8, 12)
    tokens = FluxPipeline._pack_latents(cond, 2, 4, 8, 12)
    ids = FluxPipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32)
    ids[:, 0] = 1
    with torch.no_grad():
        manual = t(**{**inp, "hidden_states": torch.cat([inp["hidden_states"], tokens], 1),
                      "img_ids": torch.cat([inp["img_ids"], ids])}).sample[:, :24]  # fmt: skip
        plain = t(**inp).sample
        kontext = KontextConditions(t)
        kontext.set(cond)
        hooked = t(**inp).sample
        kontext.set(None)
        again = t(**inp).sample
    torch.testing.assert_close(hooked, manual)
    assert hooked.shape == plain.shape and not torch.allclose(hooked, plain)
    torch.testing.assert_close(again, plain)
    with pytest.raises(ValueError, match="even h, w"):
        kontext.set(torch.randn(2, 4, 7, 12))


def test_flux_kontext_pipeline_generates_with_the_router():
    pipe = tiny_flux_pipeline()
    t = pipe.transformer.eval()
    im = InstructMoLE(t, InstructConfig(**SMALL), text_dim=32, total_steps=10)
    with torch.no_grad():
        for layer in mole_layers(t).values():
            layer.lora_B.normal_(0, 0.1)
    seen = []
    t.register_forward_pre_hook(lambda m, a, k: seen.append(k["hidden_states"].shape[1]), with_kwargs=True)
    img = Image.new("RGB", (32, 32), (200, 100, 50))
    out = pipe(prompt="make it blue", image=img, height=32, width=32, num_inference_steps=1, guidance_scale=2.5,
               _auto_resize=False, max_area=32 * 32, max_sequence_length=16, output_type="np")  # fmt: skip
    assert out.images.shape == (1, 32, 32, 3)
    assert seen == [2 * 64]  # 8x8 image tokens + as many condition tokens
    assert im.router.last_weights.shape == (3, 1, 8) and not im.router.training


def test_stage4_trains_on_flux_kontext_and_writes_the_routing_heatmap(tmp_path, monkeypatch):
    from mole.training import load_config, train

    if not FACES:
        pytest.skip("shared data missing")
    tiny_flux_pipeline().save_pretrained(tmp_path / "flux")
    data = tmp_path / "data"
    data.mkdir()
    records = []
    for i, f in enumerate(FACES[:2]):
        face = Image.open(f).convert("RGB").resize((32, 32))
        face.save(data / f"{i}.png")
        face.filter(ImageFilter.FIND_EDGES).save(data / f"{i}_edge.png")
        face.filter(ImageFilter.GaussianBlur(2)).save(data / f"{i}_blur.png")
        face.resize((16, 24)).save(data / f"{i}_small.png")  # a second condition of another size
        records.append({"file": f"{i}.png", "caption": "draw the face outlined by these edges",
                        "condition": [f"{i}_edge.png", f"{i}_small.png"], "condition_type": ["edge", "blur"]})
        records.append({"file": f"{i}.png", "caption": "sharpen this blurry face photo",
                        "condition": [f"{i}_blur.png", f"{i}_small.png"], "condition_type": "blur"})  # fmt: skip
    (data / "m.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    from diffusers import FluxTransformer2DModel

    from mole.training import stages

    drops = []
    real_draw = stages.conditions_dropped
    steps = []  # the optimizer step each micro-batch's draw is keyed by
    monkeypatch.setattr(stages, "conditions_dropped",
                        lambda seed, step, rate: steps.append(step) or drops.append(real_draw(seed, step, rate))
                        or drops[-1])  # fmt: skip
    seen = []  # tokens each training call of the transformer gets (after Kontext appended the conditions)
    real_forward = FluxTransformer2DModel.forward

    def counting(self, hidden_states=None, *a, **k):
        seen.append(hidden_states.shape[1])
        return real_forward(self, hidden_states, *a, **k)

    FluxTransformer2DModel.forward = counting
    try:
        result = train(load_config(preset="instruct", overrides=[
        f"model='{tmp_path / 'flux'}'", f"data.path='{data}'", f"data.manifest='{data / 'm.jsonl'}'",
        f"output_dir='{tmp_path / 'o'}'", "max_steps=2", "data.resolution=32", "batch_size=1", "grad_accum=2",
        "tensorboard=false",
        "instruct.rank=4", "instruct.shared_rank=4", "instruct.resampler_dim=32", "instruct.resampler_heads=2",
        "instruct.condition_types=['edge', 'blur']", "data.caption_dropout=0.0", "log_every=1",
        "instruct.condition_dropout=0.5",
    ]))  # fmt: skip
    finally:
        FluxTransformer2DModel.forward = real_forward
    assert steps == [0, 0, 1, 1] and len(seen) >= len(drops) + 1
    assert drops[0] == drops[1] and drops[2] == drops[3]  # one draw per step: its micro-batches agree
    assert seen[0] == 64 + 64 + 64  # the loss probe runs first and always keeps its conditions
    for dropped, tokens in zip(drops, seen[1:]):  # 8x8 image tokens, + 64 per condition (both cut to 32 px)
        assert tokens == (64 if dropped else 64 + 64 + 64)
    assert drops == [False, False, True, True]  # seed 0 at rate 0.5: step 0 keeps its conditions, step 1 drops them
    assert [p.name for p in result.final] == ["instruct.safetensors", "routing.png", "routing.json"]
    rows = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["instruct/load_balance"] > 0 and "instruct/ortho" in r for r in rows)
    assert rows[0]["instruct/aux_weight"] == pytest.approx(1.0)
    assert rows[1]["instruct/aux_weight"] == pytest.approx(1e-5 + 0.5 * (1 - 1e-5) * 2 * 0.5)  # step 1 of 2
    routing = json.loads((tmp_path / "o" / "final" / "routing.json").read_text())
    assert set(routing) == {"edge+blur", "blur"} and all(len(v) == 8 and 0 < sum(v) < 1 for v in routing.values())
    fresh = tiny_flux_pipeline().transformer
    im = InstructMoLE.load(fresh, result.final[0], strict_base=False)
    assert len(mole_layers(fresh)) == 3 and len(im.shared.paths) == 17
    trained = float(sum(layer.lora_B.abs().sum() for layer in mole_layers(fresh).values()))
    assert trained > 0  # the experts moved from B = 0


def test_mole_tiny_cli_writes_a_loadable_kontext_pipeline_and_instruct_file(tmp_path):
    from mole.cli import main
    from mole.formats.mole_file import read_mole_manifest
    from mole.models import DiffusionModel

    assert main(["tiny", "flux-kontext", "--out", str(tmp_path), "--instruct", "--seed", "3"]) == 0
    model = DiffusionModel.from_pretrained(tmp_path / "base")
    assert type(model.pipe).__name__ == "FluxKontextPipeline" and model.backbone is Backbone.FLUX
    ref = tiny_flux(3).state_dict()  # the seed reaches the weights
    got = model.denoiser.state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    manifest = read_mole_manifest(tmp_path / "instruct.safetensors")
    assert manifest["extra"]["instruct"]["num_experts"] == 8 and manifest["extra"]["text_dim"] == 32
    assert main(["tiny", "flux-kontext", "--out", str(tmp_path)]) == 2  # never replaces without --overwrite


def test_condition_images_reach_kontext_as_the_pipeline_does_and_several_sizes_stack(tmp_path):
    from mole.inference.pipeline import condition_latents
    from mole.models import DiffusionModel

    pipe = tiny_flux_pipeline()
    model = DiffusionModel(pipe, "tiny")
    g = torch.Generator().manual_seed(0)
    img = Image.fromarray((torch.rand(40, 24, 3, generator=g) * 255).byte().numpy())  # not a multiple of 4
    img.save(tmp_path / "c.png")
    Image.new("RGB", (16, 8), (10, 200, 30)).save(tmp_path / "c2.png")
    run = dict(prompt="make it blue", height=32, width=32, num_inference_steps=2, guidance_scale=2.5, max_area=1024,
               max_sequence_length=16, output_type="np")  # fmt: skip
    ref = pipe(image=img, _auto_resize=False, generator=torch.Generator().manual_seed(1), **run).images
    seen = []
    t = pipe.transformer
    kontext = KontextConditions(t)  # hooks run in order: this one sees the tokens Kontext appended
    t.register_forward_pre_hook(lambda m, a, k: seen.append(k["hidden_states"].shape[1]), with_kwargs=True)
    lat = condition_latents(model, [tmp_path / "c.png"])
    assert lat[0].shape == (1, 4, 20, 12)  # 40 x 24 px (already a multiple of 4) / 2
    kontext.set(lat)
    ours = pipe(generator=torch.Generator().manual_seed(1), **run).images
    assert float(abs(ours - ref).max()) < 1e-5 and seen[-1] == 64 + 10 * 6
    kontext.set(condition_latents(model, [tmp_path / "c.png", tmp_path / "c2.png"]))
    two = pipe(generator=torch.Generator().manual_seed(1), **run).images
    assert seen[-1] == 64 + 60 + 2 * 4 and float(abs(two - ours).max()) > 1e-4  # the one above: exactly 0
    tokens, ids = KontextConditions.pack_all([torch.zeros(1, 4, 20, 12), torch.zeros(1, 4, 4, 8)])
    assert tokens.shape == (1, 68, 16) and (ids[:, 0] == 1).all()
    assert ids[:60, 2].max() == 5 and ids[60:, 2].min() == 6 and ids[60:, 2].max() == 9  # side by side
    kontext.remove()


def test_mole_generate_with_condition_images_writes_images_and_routing(tmp_path):
    from mole.cli import main

    assert main(["tiny", "flux-kontext", "--out", str(tmp_path / "m"), "--instruct"]) == 0
    Image.new("RGB", (40, 24), (200, 30, 30)).save(tmp_path / "a.png")
    Image.new("RGB", (16, 16), (20, 30, 200)).save(tmp_path / "b.png")
    prompts = ["make it blue", "sharpen this blurry photo"]
    argv = ["generate", "--base", str(tmp_path / "m" / "base"), "--mole", str(tmp_path / "m" / "instruct.safetensors"),
            "--prompt", prompts[0], "--prompt", prompts[1], "--image", str(tmp_path / "a.png"),
            "--image", str(tmp_path / "b.png"), "--steps", "2", "--height", "32", "--width", "32",
            "--out", str(tmp_path / "g")]  # fmt: skip
    assert main(argv) == 0
    recs = [json.loads(x) for x in (tmp_path / "g" / "images.jsonl").read_text().splitlines()]
    assert [Image.open(r["path"]).size for r in recs] == [(32, 32), (32, 32)]
    assert recs[0]["images"] == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    from mole.instruct import InstructMoLE
    from mole.models import DiffusionModel

    model = DiffusionModel.from_pretrained(tmp_path / "m" / "base")
    im = InstructMoLE.load(model.denoiser, tmp_path / "m" / "instruct.safetensors")
    for rec, prompt in zip(recs, prompts):
        pe, pooled, _ = model.pipe.encode_prompt(prompt, prompt_2=None, max_sequence_length=512)
        with torch.no_grad():
            w = im.router(pe, None, pooled)[:, 0]  # (layers, E): what the router gives this instruction
        assert list(rec["routing"]) == im.router.layer_paths
        for j, r in enumerate(rec["routing"].values()):
            top = torch.topk(w[j], 4)
            assert r["experts"] == [f"expert{i}" for i in top.indices.tolist()]
            assert r["weights"] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert recs[0]["routing"] != recs[1]["routing"]  # routed by the instruction
    assert main(argv[:-2] + ["--out", str(tmp_path / "g2"), "--image", str(tmp_path / "none.png")]) == 2

    # inspect on the same file: the routing picture and numbers per prompt, the same routing as generate recorded
    argv = ["inspect", "--base", str(tmp_path / "m" / "base"), "--mole", str(tmp_path / "m" / "instruct.safetensors"),
            "--prompt", prompts[0], "--prompt", prompts[1], "--image", str(tmp_path / "a.png"), "--steps", "1",
            "--height", "32", "--width", "32", "--out", str(tmp_path / "i")]  # fmt: skip
    assert main(argv) == 0
    data = json.loads((tmp_path / "i" / "routing.json").read_text())
    assert [r["prompt"] for r in data["routing"]] == prompts and data["layers"] == im.router.layer_paths
    for r, rec in zip(data["routing"], recs):
        for path, got in r["chosen"].items():  # generate routed a batch of 2, inspect one prompt: within 1e-5
            assert got["experts"] == rec["routing"][path]["experts"]
            assert got["weights"] == pytest.approx(rec["routing"][path]["weights"], abs=1e-5)
        assert all(sum(x > 0 for x in w) == 4 and len(w) == 8 for w in r["weights"].values())
    heat = Image.open(tmp_path / "i" / "routing_0.png")
    assert heat.size == (90 + 56 * 8 + 10, 40 + 56 * len(im.router.layer_paths) + 10)  # layers x experts
    assert (tmp_path / "i" / "routing.png").is_file() and (tmp_path / "i" / "image_1.png").is_file()

def test_default_size_comes_from_the_pipelines_own_defaults():
    from mole.inference.pipeline import default_size
    from mole.models import DiffusionModel
    from mole.tiny import tiny_pipeline

    flux = DiffusionModel(tiny_flux_pipeline(), "tiny")  # FluxTransformer2DModel's config has no sample_size
    assert default_size(flux) == (128 * 2, 128 * 2)  # FluxKontextPipeline.default_sample_size x vae_scale_factor
    sd = DiffusionModel(tiny_pipeline("sd15"), "tiny")
    assert default_size(sd) == (16 * 2, 16 * 2)  # the UNet's sample_size x the tiny VAE's factor 2


def test_the_routing_signal_reads_the_whole_instruction_not_its_last_token():
    t = tiny_flux().eval()
    im = InstructMoLE(t, InstructConfig(**SMALL), text_dim=32, total_steps=10)
    inp = flux_inputs(t, batch=1)
    text = inp["encoder_hidden_states"]
    early = text.clone()
    early[:, 0] += 3.0  # the instruction differs in its first token only; the last token is the same
    with torch.no_grad():
        t(**inp)
        w = im.router.last_weights.clone()
        t(**{**inp, "encoder_hidden_states": early})
        w_early = im.router.last_weights.clone()
        z, z_early = im.router.signal(text), im.router.signal(early)
    assert float((z - z_early).abs().max()) > 1e-3  # a last-token signal would give exactly 0
    assert float((w - w_early).abs().max()) > 1e-4  # and the layers' weights follow it
    mean = InstructMoLE(tiny_flux().eval(), InstructConfig(**SMALL, variant="package", pooling="mean"), text_dim=32)
    mask = torch.tensor([[1, 1, 1, 0, 0]])  # masked mean over the 3 real tokens, then the LayerNorm
    z = mean.router.signal(text, mask)
    torch.testing.assert_close(z, mean.router.norm(text[:, :3].mean(1)))


def test_each_layer_is_routed_by_its_own_gate_row():
    t = tiny_flux().eval()
    im = InstructMoLE(t, InstructConfig(**SMALL), text_dim=32, total_steps=10)
    inp = flux_inputs(t, batch=2)
    with torch.no_grad():
        t(**inp)
        z = im.router.signal(inp["encoder_hidden_states"], None, inp["pooled_projections"])
    layers = mole_layers(t)
    paths = im.router.layer_paths
    assert len(paths) == 3
    for j, path in enumerate(paths):
        scores = torch.softmax(z @ im.router.gates[j].weight.T, -1)  # official: softmax, top-4, not renormalised
        top = torch.topk(scores, 4, -1)
        expected = torch.zeros_like(scores).scatter(-1, top.indices, top.values)
        torch.testing.assert_close(layers[path].routing, expected)
    first, last = layers[paths[0]].routing, layers[paths[-1]].routing
    assert float((first - last).abs().max()) > 1e-3  # the rows differ, so a swapped order is seen


def test_multi_condition_records_and_the_official_condition_dropout(tmp_path):
    from mole.data.dataset import CaptionedImages, DataError, collate, scan_samples
    from mole.training.stages import conditions_dropped

    g = torch.Generator().manual_seed(0)
    target = Image.fromarray((torch.rand(24, 40, 3, generator=g) * 255).byte().numpy())  # 40 x 24 px
    target.save(tmp_path / "t.png")
    target.convert("L").convert("RGB").save(tmp_path / "grey.png")  # aligned: the target's size
    Image.new("RGB", (10, 30), (0, 200, 0)).save(tmp_path / "ref.png")  # another size
    recs = [{"file": "t.png", "caption": "colour it", "condition": ["grey.png", "ref.png"],
             "condition_type": ["grey", "subject"]},
            {"file": "t.png", "caption": "one", "condition": "grey.png", "condition_type": "grey"}]  # fmt: skip
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    samples = scan_samples(tmp_path, tmp_path / "m.jsonl")
    assert samples[0].condition_types == ("grey", "subject") and samples[0].condition_type == "grey+subject"
    ds = CaptionedImages(samples, resolution=16, center_crop=False, random_flip=True, seed=3)  # random crop and flip
    item = ds[0]
    assert [tuple(c.shape) for c in item["conditions"]] == [(3, 16, 16), (3, 16, 16)]
    luma = torch.tensor([0.299, 0.587, 0.114])[:, None, None]
    grey = (item["pixels"] * luma).sum(0)  # the aligned condition shares the target's resize and crop
    assert float((item["conditions"][0][0] - grey).abs().mean()) < 0.02
    assert float((item["conditions"][0][0] - grey.flip(-1)).abs().mean()) > 0.1  # (a flipped crop is far)
    assert float((item["conditions"][1][1] - (200 / 127.5 - 1)).abs().max()) < 1e-5  # the other: its own crop
    batch = collate([ds[0], ds[0]])
    assert len(batch["conditions"]) == 2 and batch["condition_types"] == [["grey", "grey"], ["subject", "subject"]]
    with pytest.raises(DataError, match="same number of conditions"):
        collate([ds[0], ds[1]])
    (tmp_path / "bad.jsonl").write_text(json.dumps({**recs[0], "condition_type": ["grey", "a", "b"]}))
    with pytest.raises(DataError, match="2 condition image"):
        scan_samples(tmp_path, tmp_path / "bad.jsonl")
    assert InstructConfig().condition_dropout == 0.05  # official
    draws = [conditions_dropped(0, step, 0.05) for step in range(4000)]
    assert 0.04 < sum(draws) / len(draws) < 0.06
    assert draws == [conditions_dropped(0, step, 0.05) for step in range(4000)]  # a function of seed and step
    assert draws != [conditions_dropped(1, step, 0.05) for step in range(4000)]
    assert not any(conditions_dropped(0, step, 0.0) for step in range(100))


def test_generate_on_pixart_with_typed_condition_tokens(tmp_path):
    import numpy as np

    from mole.cli import main
    from mole.tiny import tiny_pipeline, tiny_t5_tokenizer

    pipe = tiny_pipeline("pixart", tokenizer=tiny_t5_tokenizer())
    pipe.text_encoder.eval()
    pipe.save_pretrained(tmp_path / "base")
    cfg = InstructConfig(variant="package", num_experts=3, rank=2, condition_types=["edge", "blur"])
    im = InstructMoLE(pipe.transformer, cfg, text_dim=32)
    with torch.no_grad():
        im.conditions.type_embedding.weight.normal_(0, 1.0)  # trained types differ clearly
    im.save(tmp_path / "i.safetensors", base_model=str(tmp_path / "base"))
    Image.new("RGB", (24, 16), (200, 30, 30)).save(tmp_path / "c.png")
    argv = ["generate", "--base", str(tmp_path / "base"), "--mole", str(tmp_path / "i.safetensors"), "--prompt",
            "outline it", "--image", str(tmp_path / "c.png"), "--steps", "2", "--height", "16", "--width", "16"]
    outs = {}
    for ctype in ("edge", "blur"):
        assert main(argv + ["--condition-type", ctype, "--out", str(tmp_path / ctype)]) == 0
        rec = json.loads((tmp_path / ctype / "images.jsonl").read_text())
        assert set(rec["routing"]) == set(im.router.layer_paths)
        outs[ctype] = np.asarray(Image.open(rec["path"]), dtype=np.float32)
    assert outs["edge"].shape == (16, 16, 3) and np.abs(outs["edge"] - outs["blur"]).max() > 0  # the type counts
    assert main(argv + ["--out", str(tmp_path / "x")]) == 2  # two types known: --condition-type is needed
