"""One finder of weight files, one safetensors header reader, and the loader's choice of files: an fp16
model reads the fp16 variant where the folder has both (half the bytes); loading that fails early leaves
torch's thread count as it found it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from sd_endpoint.errors import ModelLoadError
from sd_endpoint.model import fast_load
from sd_endpoint.model.discovery import ModelSource
from sd_endpoint.model.loading import load_pipeline
from sd_endpoint.model.placement import Placement
from sd_endpoint.model.weights import COMPONENTS, choose_variant, read_header, weight_files


@pytest.fixture(scope="module")
def both(tiny_model_dir: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's fp32 files plus fp16 variant files holding *other* weights (another seed), so a
    loaded tensor tells which file it came from."""
    from sd_endpoint.model.demo import build_demo_pipeline

    folder = tmp_path_factory.mktemp("both") / "model"
    shutil.copytree(tiny_model_dir, folder)
    other = build_demo_pipeline(seed=7, cache_dir=cache_dir)
    for comp in COMPONENTS:
        getattr(other, comp).to(torch.float16).save_pretrained(str(folder / comp), variant="fp16")
    return folder


def test_the_variant_follows_the_dtype(both: Path, tiny_model_dir: Path) -> None:
    assert choose_variant(both, "float16") == "fp16"
    assert choose_variant(both, "float32") is None and choose_variant(both, "bfloat16") is None
    assert choose_variant(tiny_model_dir, "float16") is None  # no fp16 files


def test_an_fp16_model_reads_the_fp16_files_and_an_fp32_one_the_plain_files(both: Path, cache_dir: Path) -> None:
    source = ModelSource("diffusers", str(both), "test")
    fp16_file = load_file(str(both / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
    plain_file = load_file(str(both / "unet" / "diffusion_pytorch_model.safetensors"))
    key = "conv_in.weight"
    assert not torch.equal(fp16_file[key], plain_file[key].to(torch.float16))  # the two files differ
    half = load_pipeline(source, Placement("cpu", "float16", "test"), cache_dir)
    assert torch.equal(half.unet.state_dict()[key], fp16_file[key])
    full = load_pipeline(source, Placement("cpu", "float32", "test"), cache_dir)
    assert torch.equal(full.unet.state_dict()[key], plain_file[key])


def test_a_folder_with_only_fp16_files_reads_them_whatever_the_dtype(both: Path, tmp_path: Path) -> None:
    folder = tmp_path / "fp16-only"
    shutil.copytree(both, folder)
    for comp in COMPONENTS:
        for f in weight_files(folder / comp, None):
            f.unlink()
    assert choose_variant(folder, "float32") == "fp16"


def test_the_finder_knows_shards_and_bin_files(tmp_path: Path) -> None:
    unet, text = tmp_path / "unet", tmp_path / "text_encoder"
    unet.mkdir()
    text.mkdir()
    assert weight_files(unet, None) == []
    index = {
        "weight_map": {
            "a": "diffusion_pytorch_model-00002.safetensors",
            "b": "diffusion_pytorch_model-00001.safetensors",
        }
    }
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    assert [p.name for p in weight_files(unet, None)] == [
        "diffusion_pytorch_model-00001.safetensors",
        "diffusion_pytorch_model-00002.safetensors",
    ]
    (text / "pytorch_model.bin").write_bytes(b"")
    assert weight_files(text, None) == [text / "pytorch_model.bin"]
    assert weight_files(text, "fp16") == []


def test_the_header_reader_names_a_truncated_file(tiny_model_dir: Path, tmp_path: Path) -> None:
    file = tmp_path / "w.safetensors"
    data = (tiny_model_dir / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    file.write_bytes(data)
    specs = read_header(file)
    assert specs[-1].end == len(data) and all(s.dtype == "float32" for s in specs)
    file.write_bytes(data[:-1])
    with pytest.raises(ModelLoadError, match=rf"{file}: truncated: the header describes {len(data)} bytes"):
        read_header(file)


@pytest.fixture
def two_threads() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the loader sets 1 while it reads; 2 tells whether it put it back
    yield
    torch.set_num_threads(before)


def test_threads_are_restored_when_loading_fails_after_an_early_read(
    two_threads: None, tiny_model_dir: Path, tmp_path: Path, cache_dir: Path
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "unet" / "config.json").write_text("{not json")  # the checks refuse it before any loading
    early = fast_load.start_load(folder, "cpu", "float32")  # as create_backend starts it and hands it on
    assert early is not None
    with pytest.raises(ModelLoadError, match="cannot read it as JSON"):
        load_pipeline(
            ModelSource("diffusers", str(folder), "test"), Placement("cpu", "float32", "t"), cache_dir, early=early
        )
    assert torch.get_num_threads() == 2


def test_threads_are_restored_when_the_fast_loader_fails_early(
    two_threads: None, tiny_model_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model_index.json").write_text("{not json")
    with pytest.raises(json.JSONDecodeError):
        fast_load.load_folder(folder, "cpu", "float32")
    assert torch.get_num_threads() == 2
