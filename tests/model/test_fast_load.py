"""The fast loader: the same modules as from_pretrained, in the target dtype, from every layout it accepts,
and a clean refusal (so the caller falls back) for the rest."""

from __future__ import annotations

import json
import logging
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sd_endpoint.errors import ModelLoadError
from sd_endpoint.model import fast_load
from sd_endpoint.model.fast_load import FastLoadUnsupported, load_folder
from sd_endpoint.model.weights import read_header


def plain(folder: Path, dtype: torch.dtype = torch.float32, **kw: Any) -> Any:
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(
        str(folder), torch_dtype=dtype, safety_checker=None, feature_extractor=None, requires_safety_checker=False, **kw
    )


def assert_same_weights(a: Any, b: Any) -> None:
    for comp in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, comp).state_dict(), getattr(b, comp).state_dict()
        assert sa.keys() == sb.keys(), comp
        for key in sa:
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), f"{comp}.{key}"


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> Any:
    return plain(tiny_model_dir)


def test_same_pipeline_as_from_pretrained(tiny_model_dir: Path, reference: Any) -> None:
    fast = load_folder(tiny_model_dir, "cpu", "float32")
    assert_same_weights(fast, reference)
    for comp in ("unet", "vae"):
        assert dict(getattr(fast, comp).config) == dict(getattr(reference, comp).config)
    assert fast.text_encoder.config.to_dict() == reference.text_encoder.config.to_dict()
    assert dict(fast.scheduler.config) == dict(reference.scheduler.config)
    assert fast.tokenizer("a cat!")["input_ids"] == reference.tokenizer("a cat!")["input_ids"]
    assert not any(p.requires_grad for p in fast.unet.parameters()) and not fast.unet.training
    images = []
    for pipe in (fast, reference):
        pipe.set_progress_bar_config(disable=True)
        out = pipe("a cat", height=64, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(1))
        images.append(np.asarray(out.images[0]))
    assert np.array_equal(images[0], images[1])


def test_converts_to_the_target_dtype_while_reading(tiny_model_dir: Path, reference: Any) -> None:
    fast = load_folder(tiny_model_dir, "cpu", "bfloat16")
    ref = reference.unet.state_dict()
    for key, value in fast.unet.state_dict().items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, ref[key].to(torch.bfloat16)), key


@pytest.fixture(scope="module")
def variants(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp16 variant files only, a sharded UNet, and a text encoder saved with transformers 4's names."""
    folder = tmp_path_factory.mktemp("variants") / "model"
    shutil.copytree(tiny_model_dir, folder)
    pipe = plain(tiny_model_dir)
    for comp in ("vae", "text_encoder"):
        stem = "model" if comp == "text_encoder" else "diffusion_pytorch_model"
        (folder / comp / f"{stem}.safetensors").unlink()
        getattr(pipe, comp).to(torch.float16).save_pretrained(str(folder / comp), variant="fp16")
    shutil.rmtree(folder / "unet")
    pipe.unet.to(torch.float16).save_pretrained(str(folder / "unet"), variant="fp16", max_shard_size=300_000)
    # transformers 4 prefixed the text encoder's tensors with "text_model."; rewrite the file that way.
    from safetensors.torch import load_file, save_file

    te = folder / "text_encoder" / "model.fp16.safetensors"
    save_file({f"text_model.{k}": v for k, v in load_file(str(te)).items()}, str(te), metadata={"format": "pt"})
    return folder


def test_fp16_variant_sharded_and_prefixed_layouts(variants: Path) -> None:
    assert len(list((variants / "unet").glob("*.safetensors"))) > 1  # really sharded
    assert any(
        s.name.startswith("text_model.") for s in read_header(variants / "text_encoder" / "model.fp16.safetensors")
    )
    fast = load_folder(variants, "cpu", "float32", variant="fp16")
    assert_same_weights(fast, plain(variants, variant="fp16"))


def test_unknown_names_or_bin_weights_are_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    vae = folder / "vae" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(vae))
    tensors["encoder.legacy_extra.weight"] = torch.zeros(1)
    save_file(tensors, str(vae))
    with pytest.raises(FastLoadUnsupported, match=r"vae: tensor names differ .*legacy_extra"):
        load_folder(folder, "cpu", "float32")
    vae.unlink()
    torch.save(tensors, folder / "vae" / "diffusion_pytorch_model.bin")
    with pytest.raises(FastLoadUnsupported, match="only .bin weights"):
        load_folder(folder, "cpu", "float32")


def test_load_pipeline_falls_back_to_from_pretrained(
    tiny_model_dir: Path, tmp_path: Path, cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from sd_endpoint.model.discovery import ModelSource
    from sd_endpoint.model.loading import load_pipeline
    from sd_endpoint.model.placement import Placement

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(str(unet)), folder / "unet" / "diffusion_pytorch_model.bin")
    unet.unlink()
    with caplog.at_level(logging.INFO, logger="sd_endpoint.model.loading"):
        pipe = load_pipeline(ModelSource("diffusers", str(folder), "test"), Placement("cpu", "float32", "t"), cache_dir)
    assert "instead of the fast loader" in caplog.text
    assert_same_weights(pipe, plain(tiny_model_dir))


def test_truncated_file_raises_instead_of_loading_garbage(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    data = unet.read_bytes()
    unet.write_bytes(data[: len(data) - 1000])
    # The shared header reader sees it before any tensor is read (a file cut while it is being read still
    # fails in the reader: "unexpected end of file").
    with pytest.raises(ModelLoadError, match=rf"{unet}: truncated"):
        load_folder(folder, "cpu", "float32")


def test_header_offsets_cover_the_file(tiny_model_dir: Path) -> None:
    file = tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors"
    specs = read_header(file)
    (header_len,) = struct.unpack("<Q", file.read_bytes()[:8])
    assert specs[0].start == 8 + header_len and specs[-1].end == file.stat().st_size
    assert all(a.end == b.start for a, b in zip(specs, specs[1:], strict=False))
    names = json.loads(file.read_bytes()[8 : 8 + header_len])
    assert {s.name for s in specs} == set(names) - {"__metadata__"}


def test_reads_bypass_the_page_cache_where_allowed_and_fall_back_where_not(
    tiny_model_dir: Path, reference: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    def can_open_direct(path: Path) -> bool:
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
        except (AttributeError, OSError):  # no O_DIRECT here, or a file system without it (tmpfs)
            return False
        return True

    pending = fast_load.PendingLoad(tiny_model_dir, "cpu", "float32", None)
    direct = pending.direct
    pending.result()
    assert direct == can_open_direct(tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors")
    monkeypatch.delattr(os, "O_DIRECT", raising=False)  # as on a platform or file system without it
    pending = fast_load.PendingLoad(tiny_model_dir, "cpu", "float32", None)
    assert not pending.direct
    pending.result()
    assert_same_weights(load_folder(tiny_model_dir, "cpu", "float32"), reference)


def test_early_load_in_nhwc_is_adopted_by_load_folder(tiny_model_dir: Path, reference: Any) -> None:
    threads = torch.get_num_threads()
    pending = fast_load.start_load(tiny_model_dir, "cpu", "bfloat16", channels_last=True)
    assert pending is not None
    pipe = load_folder(tiny_model_dir, "cpu", "bfloat16", early=pending)
    assert torch.get_num_threads() == threads
    conv = pipe.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert pipe.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    for comp in ("unet", "vae", "text_encoder"):
        ref = getattr(reference, comp).state_dict()
        for key, value in getattr(pipe, comp).state_dict().items():
            assert torch.equal(value, ref[key].to(torch.bfloat16)), f"{comp}.{key}"


def test_an_early_load_for_other_arguments_is_discarded(tiny_model_dir: Path, reference: Any) -> None:
    early = fast_load.start_load(tiny_model_dir, "cpu", "bfloat16", channels_last=True)
    assert early is not None
    pipe = load_folder(tiny_model_dir, "cpu", "float32", early=early)  # not what was started: read again
    assert early.tensors["unet"] == {}  # the early read was finished and dropped
    assert pipe.unet.dtype == torch.float32 and pipe.unet.conv_in.weight.is_contiguous()
    assert_same_weights(pipe, reference)
