"""One module per file format, each reading and writing its format:

    lora       LoRA expert files of any supported layout: detects the layout, load_expert / save_expert
    kohya      kohya / A1111 / ComfyUI LoRA files and kohya's module names (SDXL's SGM layout included)
    diffusers  diffusers / peft LoRA files and folders (and peft adapters in memory)
    mole_file  our file: manifest + gates (+ embedded experts)
    official   the paper's released files (JiePKU/MoLE): two kohya LoRAs and a gate file
    ldm        LDM single files (civitai-style model.safetensors: SD1.x, SD2.x, SDXL)
    common     what several formats share: reading safetensors, LoRA pair checks, the kinds MoLE cannot mix

A format module reads tensors and names into plain data (ExpertWeights, dicts of tensors, a manifest) and writes
them back; it never changes a model. Putting weights into a model is mole.inject's, orchestrating it mole.io's.
Only the error types live here.
"""

from __future__ import annotations

from ..targets import LayerNotFound


class MoLEFileError(ValueError):
    """A MoLE file does not fit the model or is malformed; the message names the key or expert."""


class FileLayerNotFound(MoLEFileError, LayerNotFound):
    """A MoLE / gate file names a layer the model (or the file's own layer list) does not have."""


class ModelLoadError(ValueError):
    """The base model cannot be loaded or is not a supported pipeline."""
