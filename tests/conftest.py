from __future__ import annotations

import pytest
import torch

from mole.tiny import random_expert, tiny_pixart, tiny_unet, unet_inputs

torch.set_num_threads(2)


@pytest.fixture(params=["sd15", "sd21", "sdxl", "pixart"])
def backbone(request):
    """(model, inputs) for every supported backbone, built tiny from configs; inputs have a non-square latent."""
    kind = request.param
    model = tiny_pixart() if kind == "pixart" else tiny_unet(kind)
    hw = (8, 12) if kind == "pixart" else (16, 12)
    return model.eval(), unet_inputs(model, hw=hw)


@pytest.fixture
def sd15():
    model = tiny_unet("sd15").eval()
    return model, unet_inputs(model, hw=(16, 12))


def out_of(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def two_experts(model, rank=4, std=0.1):
    return [
        random_expert(model, "face", rank=rank, seed=1, std=std, alpha=2.0 * rank),
        random_expert(model, "hand", rank=rank, seed=2, std=std),
    ]


# ---------------------------------------------------------------------------------------------------- training
import glob  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FACES = sorted(glob.glob(str(SHARED / "data/faces/orl/s1/*.pgm")))
HANDS = sorted(glob.glob(str(SHARED / "data/hands/sign_language_digits/0/*.JPG")))


def image_folder(path: Path, files: list[str], caption: str) -> Path:
    """Copy real shared/ images into a captioned folder (one .txt per image)."""
    path.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(files):
        dst = path / f"{i:03d}{Path(f).suffix}"
        shutil.copy(f, dst)
        dst.with_suffix(".txt").write_text(caption)
    return path


@pytest.fixture(scope="session")
def tiny_sd15_dir(tmp_path_factory):
    """A tiny SD1.5 pipeline written with save_pretrained: the local-path route real users take."""
    from mole.tiny import tiny_pipeline

    path = tmp_path_factory.mktemp("models") / "tiny-sd15"
    tiny_pipeline("sd15").save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def faces_dir(tmp_path_factory):
    if not FACES:
        pytest.skip("../shared/data/faces is not available")
    return image_folder(tmp_path_factory.mktemp("data") / "faces", FACES[:4], "a close-up photo of a face")


def t5_tokenizer():
    """The tiny T5 sentencepiece tokenizer from shared/assets (skips when absent)."""
    model = SHARED / "assets" / "t5_spiece_unigram1000.model"
    if not model.is_file():
        pytest.skip("../shared/assets/t5_spiece_unigram1000.model is not available")
    import sentencepiece as spm
    from transformers import T5Tokenizer

    sp = spm.SentencePieceProcessor(model_file=str(model))
    return T5Tokenizer(vocab=[(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())], extra_ids=0)


def pipeline_with_mole(root: Path, kind: str = "sd15") -> Path:
    """Write a tiny pipeline to root/base and a MoLE file for it (random face and hand experts) to
    root/mole.safetensors; return root."""
    from mole import inject_mole, save_mole
    from mole.tiny import random_expert, tiny_pipeline

    pipe = tiny_pipeline(kind, tokenizer=t5_tokenizer() if kind == "pixart" else None)
    pipe.save_pretrained(root / "base")
    model = pipe.transformer if kind == "pixart" else pipe.unet
    inject_mole(model, [random_expert(model, "face", seed=1, std=0.2), random_expert(model, "hand", seed=2, std=0.2)])
    save_mole(model, root / "mole.safetensors", base_model=str(root / "base"))
    return root
