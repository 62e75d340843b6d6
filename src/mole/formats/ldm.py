"""LDM single files: the original (CompVis / Stability) layout of one-file checkpoints such as civitai's
model.safetensors, SD1.x, SD2.x and SDXL, read into a diffusers pipeline and written from one.

    pipe = load_single_file("model.safetensors", tokenizer="clip_tokenizer/")
    save_single_file(pipe, "model.safetensors")   # loads back with load_single_file / from_single_file

Reading is offline: the model configs are the published ones shipped in mole/configs_full (config= a kind or a
diffusers folder overrides them); the weights come from the file; only the CLIP vocabulary (49k BPE merges) cannot
ship. It is found, in this order, in: `tokenizer` (a folder with vocab.json + merges.txt, or a pipeline folder with
tokenizer/), $MOLE_TOKENIZER, a tokenizer/ folder beside the checkpoint, the config folder, the Hugging Face cache
(any earlier download of the published model or of openai/clip-vit-large-patch14). The kind's own settings (SD2.1
and SDXL's second tokenizer pad with '!') are applied to whichever vocabulary is used.

Writing is the inverse of diffusers' single-file conversion, for any UNet2DConditionModel / AutoencoderKL / CLIP
text encoder layout (tiny test models included): SD1.x (CLIP-L under cond_stage_model.transformer), SD2.x (OpenCLIP
under cond_stage_model.model, fused in_proj) and SDXL (conditioner.embedders.0 / .1, label_emb for the added
conditions).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from ..full import KINDS, PUBLISHED, TOKENIZERS, check_kind, clip_vocab_folder, config_dir, load_tokenizer
from ..targets import Backbone, detect_backbone
from . import ModelLoadError

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- reading
SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
TOKENIZER_ENV = "MOLE_TOKENIZER"


class SingleFileError(ModelLoadError):
    """A single-file checkpoint cannot be loaded (unknown layout, missing tokenizer, ...)."""


def is_single_file(path: str | Path) -> bool:
    p = Path(path)
    return p.suffix.lower() in SUFFIXES and p.is_file()


def checkpoint_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a checkpoint file, without reading the tensors of a .safetensors file."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types
            raise SingleFileError(f"{path}: not a readable .safetensors file ({exc})") from None
    try:
        state = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:
        raise SingleFileError(f"{path}: not a readable PyTorch checkpoint ({exc})") from None
    state = state.get("state_dict", state)
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def detect_kind(shapes: dict[str, tuple[int, ...]], source: str = "checkpoint") -> str:
    """sd15 / sd21 / sdxl from the checkpoint's keys (any size: the layout tells, not the widths)."""
    keys = shapes.keys()
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if not has("model.diffusion_model."):
        raise SingleFileError(
            f"{source} has no model.diffusion_model.* keys: it is not an original-layout SD1.x / SD2.x / SDXL "
            "checkpoint (a LoRA, a VAE or a diffusers file?). Pass a diffusers pipeline folder or a full checkpoint"
        )
    conv_in = shapes.get("model.diffusion_model.input_blocks.0.0.weight", (0, 4))
    if conv_in[1] != 4:
        raise SingleFileError(
            f"{source}: the UNet takes {conv_in[1]} input channels (an inpainting or other special model); only "
            "text-to-image SD1.x / SD2.x / SDXL checkpoints are supported"
        )
    if has("conditioner.embedders.1.model."):
        return "sdxl"
    if has("conditioner.embedders.0.model."):
        raise SingleFileError(f"{source} is an SDXL refiner; only the SDXL base is supported")
    if has("cond_stage_model.model."):
        return "sd21"
    if has("cond_stage_model.transformer."):
        return "sd15"
    raise SingleFileError(f"{source} has a UNet but no text encoder this loader knows (cond_stage_model / conditioner)")


def _cached_vocab(kind: str, component: str) -> Path | None:
    """A CLIP vocabulary from the Hugging Face cache (never downloads)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a diffusers dependency
        return None
    for repo, sub in ((PUBLISHED[kind], component), (PUBLISHED[kind], "tokenizer"),
                      ("openai/clip-vit-large-patch14", "")):  # fmt: skip
        prefix = f"{sub}/" if sub else ""
        vocab = try_to_load_from_cache(repo, f"{prefix}vocab.json")
        merges = try_to_load_from_cache(repo, f"{prefix}merges.txt")
        if isinstance(vocab, str) and isinstance(merges, str) and Path(vocab).parent == Path(merges).parent:
            return Path(vocab).parent
    return None


def resolve_tokenizers(kind: str, tokenizer, checkpoint: Path, folder: Path, settings_from: Path | None = None) -> dict:
    """{'tokenizer': ..., ['tokenizer_2': ...]} for `kind`, offline (see the module docstring for the order)."""
    names = TOKENIZERS[kind]
    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        return {name: tokenizer for name in names}
    candidates = [(Path(tokenizer), "tokenizer=")] if tokenizer is not None else []
    if os.environ.get(TOKENIZER_ENV):
        candidates.append((Path(os.environ[TOKENIZER_ENV]), f"${TOKENIZER_ENV}"))
    candidates += [(checkpoint.parent / "tokenizer", "beside the checkpoint"), (folder, "the config folder")]
    out = {}
    for name in names:
        found = None
        for path, what in candidates:
            found = clip_vocab_folder(path, name)
            if found is None and what in ("tokenizer=", f"${TOKENIZER_ENV}"):
                raise SingleFileError(
                    f"{what} {str(path)!r} holds no vocab.json + merges.txt or tokenizer.json (nor a tokenizer/ "
                    "subfolder with them); pass a CLIP tokenizer folder, e.g. the tokenizer/ folder of any Stable "
                    "Diffusion download"
                )
            if found is not None:
                break
        found = found or _cached_vocab(kind, name)
        if found is None:
            raise SingleFileError(
                f"{checkpoint}: a single-file checkpoint holds no tokenizer, and no CLIP vocabulary was found offline. "
                f"Pass --tokenizer DIR (tokenizer=DIR in Python; a folder with vocab.json and merges.txt, e.g. the "
                f"tokenizer/ folder of any Stable Diffusion download), set {TOKENIZER_ENV}=DIR, or put that folder "
                f"beside the checkpoint as {checkpoint.parent / 'tokenizer'}"
            )
        settings = None
        if settings_from is not None and (settings_from / name / "tokenizer_config.json").is_file():
            settings = json.loads((settings_from / name / "tokenizer_config.json").read_text())
        out[name] = load_tokenizer(kind, found, name, settings=settings)
        logger.info("%s: %s from %s", checkpoint.name, name, found)
    return out


def load_single_file(path: str | Path, dtype: torch.dtype = torch.float32, tokenizer=None, config=None):
    """A diffusers pipeline from an original-layout checkpoint (SD1.x, SD2.x, SDXL), offline.

    config: None (the shipped published config of the detected kind: SD2.x loads as SD2.1 768 v-prediction), a kind
    name (sd15 / sd21 / sdxl), or a diffusers pipeline folder whose configs describe the file (e.g. a fine-tune of
    SD2.1-base: its model_index.json and component configs, weights not needed).
    tokenizer: a folder or tokenizer object; see resolve_tokenizers for where it is looked for otherwise.
    """
    import diffusers

    path = Path(path)
    if not path.is_file():
        raise SingleFileError(f"{path}: no such checkpoint file")
    kind = detect_kind(checkpoint_shapes(path), str(path))
    if config is None or str(config) in KINDS:
        chosen = check_kind(str(config)) if config is not None else kind
        if chosen != kind:
            raise SingleFileError(f"config={config!r} but {path} holds a {kind} model")
        folder, settings_from = config_dir(kind), None
    else:
        folder = Path(config)
        if not (folder / "model_index.json").is_file():
            raise SingleFileError(
                f"config={str(config)!r}: not a diffusers pipeline folder (no model_index.json); pass one of "
                f"{list(KINDS)} or such a folder"
            )
        settings_from = folder
    index = json.loads((folder / "model_index.json").read_text())
    pipe_cls = getattr(diffusers, index["_class_name"])
    tokenizers = resolve_tokenizers(kind, tokenizer, path, folder, settings_from)
    extra = {"safety_checker": None, "feature_extractor": None} if "safety_checker" in index else {}
    logger.info("loading %s as %s with the configs of %s", path, kind, folder)
    try:
        pipe = pipe_cls.from_single_file(str(path), config=str(folder), local_files_only=True, torch_dtype=dtype,
                                         **tokenizers, **extra)  # fmt: skip
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise SingleFileError(
            f"{path} could not be loaded as {kind} with the configs in {folder} ({type(exc).__name__}: {exc}); if it "
            "is a variant with other sizes, pass config=<a diffusers folder of that model>"
        ) from None
    _check_loaded(pipe, path)
    if pipe.config.get("requires_safety_checker"):  # no checker is loaded: do not warn about it on every call
        pipe.register_to_config(requires_safety_checker=False)
    return pipe


def _check_loaded(pipe, path: Path) -> None:
    """diffusers leaves parameters the file lacks on the meta device: refuse such a half-loaded model."""
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            missing = [n for n, p in component.named_parameters() if p.device.type == "meta"]
            if missing:
                raise SingleFileError(
                    f"{path}: {name} weights missing from the file ({len(missing)} tensors, e.g. {missing[0]}); "
                    "it does not match the model config"
                )


# ---------------------------------------------------------------------------------------------------- writing
UNET = "model.diffusion_model."
VAE = "first_stage_model."
_RESNET = (("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("time_emb_proj.", "emb_layers.1."),
           ("norm2.", "out_layers.0."), ("conv2.", "out_layers.3."),
           ("conv_shortcut.", "skip_connection."))  # fmt: skip


def _rename(key: str, prefixes: list[tuple[str, str, tuple]]) -> str:
    for new, old, inner in prefixes:
        if key.startswith(new):
            rest = key[len(new) :]
            for a, b in inner:
                if rest.startswith(a):
                    rest = b + rest[len(a) :]
                    break
            return old + rest
    raise KeyError(key)


def unet_to_original(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A UNet2DConditionModel state dict in the original (openaimodel) layout, without the model. prefix."""
    lpb = config["layers_per_block"]
    if not isinstance(lpb, int):
        raise ValueError(f"layers_per_block={lpb!r}: only one value for every block has an original layout")
    n = len(config["block_out_channels"])
    pairs: list[tuple[str, str, tuple]] = [
        ("time_embedding.linear_1.", "time_embed.0.", ()), ("time_embedding.linear_2.", "time_embed.2.", ()),
        ("add_embedding.linear_1.", "label_emb.0.0.", ()), ("add_embedding.linear_2.", "label_emb.0.2.", ()),
        ("conv_in.", "input_blocks.0.0.", ()), ("conv_norm_out.", "out.0.", ()), ("conv_out.", "out.2.", ()),
        ("mid_block.resnets.0.", "middle_block.0.", _RESNET), ("mid_block.attentions.0.", "middle_block.1.", ()),
        ("mid_block.resnets.1.", "middle_block.2.", _RESNET),
    ]  # fmt: skip
    for i in range(n):
        for j in range(lpb):
            idx = 1 + i * (lpb + 1) + j
            pairs += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{idx}.0.", _RESNET),
                      (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{idx}.1.", ())]  # fmt: skip
        pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{1 + i * (lpb + 1) + lpb}.0.op.", ()))
        has_attn = any(k.startswith(f"up_blocks.{i}.attentions.") for k in state)
        for j in range(lpb + 1):
            idx = i * (lpb + 1) + j
            pairs += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{idx}.0.", _RESNET),
                      (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{idx}.1.", ())]  # fmt: skip
        pairs.append((f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{i * (lpb + 1) + lpb}."
                      f"{2 if has_attn else 1}.conv.", ()))  # fmt: skip
    pairs.sort(key=lambda p: -len(p[0]))  # down_blocks.1.resnets.1 before down_blocks.1.resnets.1x
    return {_rename(k, pairs): v for k, v in state.items()}


def vae_to_original(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    n = len(config["block_out_channels"])
    attn = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out."))
    res = (("conv_shortcut.", "nin_shortcut."),)
    pairs: list[tuple[str, str, tuple]] = []
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.conv_norm_out.", f"{part}.norm_out.", ()),
                  (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", res),
                  (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", res),
                  (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", attn),
                  (f"{part}.conv_in.", f"{part}.conv_in.", ()),
                  (f"{part}.conv_out.", f"{part}.conv_out.", ())]  # fmt: skip
    for i in range(n):
        pairs += [(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.", ()),
                  (f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv.", ()),
                  (f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block.", ()),
                  (f"decoder.up_blocks.{i}.upsamplers.0.conv.",
                   f"decoder.up.{n - 1 - i}.upsample.conv.", ())]  # fmt: skip
    pairs += [("quant_conv.", "quant_conv.", ()), ("post_quant_conv.", "post_quant_conv.", ())]
    pairs.sort(key=lambda p: -len(p[0]))
    out = {}
    for k, v in state.items():
        new = _rename(k, pairs).replace("conv_shortcut.", "nin_shortcut.")
        if ".mid.attn_1." in new and new.endswith(".weight") and v.ndim == 2:
            v = v[:, :, None, None]  # the original attention projections are 1x1 convs
        out[new] = v
    return out


def _flat_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP text state dict with the text_model. level (newer transformers flatten CLIPTextModel)."""
    return {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in state.items()}


def clip_to_original(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """An OpenAI CLIP text tower (SD1.x, SDXL's first encoder): the transformers keys under `prefix`."""
    return {prefix + k: v for k, v in _flat_clip(state).items() if not k.endswith("position_ids")}


def open_clip_to_original(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """An OpenCLIP text tower (SD2.x, SDXL's second encoder): resblocks with fused in_proj, text_projection (d, e)."""
    state = {k.removeprefix("text_model."): v for k, v in _flat_clip(state).items() if not k.endswith("position_ids")}
    out: dict[str, torch.Tensor] = {}
    simple = {"embeddings.token_embedding.weight": "token_embedding.weight",
              "embeddings.position_embedding.weight": "positional_embedding",
              "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}  # fmt: skip
    layer_names = (("self_attn.out_proj.", "attn.out_proj."), ("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."),
                   ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj."))  # fmt: skip
    for k, v in state.items():
        if k in simple:
            out[prefix + simple[k]] = v
        elif k == "text_projection.weight":
            out[prefix + "text_projection"] = v.T.contiguous()
        elif k.startswith("encoder.layers."):
            _, _, i, rest = k.split(".", 3)
            base = f"{prefix}transformer.resblocks.{i}."
            if rest.startswith("self_attn.q_proj."):
                kind = rest.rsplit(".", 1)[1]
                parts = [state[f"encoder.layers.{i}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                out[base + f"attn.in_proj_{kind}"] = torch.cat(parts)
            elif rest.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
                continue
            else:
                for a, b in layer_names:
                    if rest.startswith(a):
                        out[base + b + rest[len(a) :]] = v
                        break
                else:
                    raise KeyError(k)
        else:
            raise KeyError(k)
    return out


def pipeline_to_original(pipe) -> dict[str, torch.Tensor]:
    """SD1.x / SD2.x / SDXL pipeline -> one original-layout state dict (what a civitai .safetensors holds)."""
    unet, vae = pipe.unet, pipe.vae
    out = {UNET + k: v for k, v in unet_to_original(unet.state_dict(), unet.config).items()}
    out.update({VAE + k: v for k, v in vae_to_original(vae.state_dict(), vae.config).items()})
    te2 = getattr(pipe, "text_encoder_2", None)
    if te2 is not None:  # SDXL
        out.update(clip_to_original(pipe.text_encoder.state_dict(), "conditioner.embedders.0.transformer."))
        out.update(open_clip_to_original(te2.state_dict(), "conditioner.embedders.1.model."))
    elif detect_backbone(unet) is Backbone.SD21:  # OpenCLIP
        out.update(open_clip_to_original(pipe.text_encoder.state_dict(), "cond_stage_model.model."))
    else:  # OpenAI CLIP: SD1.x
        out.update(clip_to_original(pipe.text_encoder.state_dict(), "cond_stage_model.transformer."))
    return {k: v.detach().contiguous() for k, v in out.items()}


def save_single_file(pipe, path: str | Path) -> Path:
    """Write the pipeline's UNet, VAE and text encoders as one original-layout .safetensors file."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file(pipeline_to_original(pipe), str(path))
    return path
