"""Loading one original-format SD 2.x checkpoint (.safetensors or .ckpt) offline, and refusing the rest.

The checkpoints are made by ``ldm_export`` from the tiny demo pipeline (renamed to the LDM layout of
``v2-1_768-ema-pruned``), so a round trip can be compared pixel for pixel with the pipeline they came from.
No test may touch the network: every socket connection attempt is recorded and fails the test.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sd_endpoint.errors import ModelLoadError
from sd_endpoint.model.discovery import ModelSource
from sd_endpoint.model.loading import _load_single_file, load_pipeline
from sd_endpoint.model.placement import Placement
from tests.model.ldm_export import (
    TEXT_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    full_size_ldm_shapes,
    pipeline_to_ldm,
    save_ckpt,
    save_safetensors,
    write_sparse_safetensors,
)

PROMPT = "a red fox in the snow"
CPU_FP32 = Placement("cpu", "float32", "test")


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[object]]:
    """Record (and refuse) every outgoing connection; the test fails if there was one."""
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    attempts: list[object] = []

    def refuse(*args: object, **kwargs: object) -> Any:
        attempts.append(args)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield attempts
    assert attempts == [], f"network access attempted: {attempts}"


def _common() -> dict[str, Any]:
    """What load_pipeline passes to the loaders, for CPU float32."""
    return {
        "torch_dtype": torch.float32,
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


@pytest.fixture(scope="module")
def original(tiny_model_dir: Path) -> Any:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), local_files_only=True, **_common())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ldm_state(original: Any) -> dict[str, torch.Tensor]:
    return pipeline_to_ldm(original)


@pytest.fixture(scope="module")
def tiny_config_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's configs and tokenizer without any weights: the weights must come from the checkpoint."""
    target = tmp_path_factory.mktemp("tiny-config") / "config"
    shutil.copytree(tiny_model_dir, target, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return target


def _generate(pipe: Any) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(1)
    images = pipe(PROMPT, height=64, width=64, num_inference_steps=3, generator=generator, output_type="np").images
    return np.asarray(images)


def _load_production(path: Path, cache_dir: Path) -> Any:
    """The production path: load_pipeline with the packaged SD 2.1 configs."""
    return load_pipeline(ModelSource("single_file", str(path), "test"), CPU_FP32, cache_dir)


# --- the exported layout --------------------------------------------------------------------------


def test_export_has_the_openclip_layout(original: Any, ldm_state: dict[str, torch.Tensor]) -> None:
    layers = original.text_encoder.config.num_hidden_layers
    hidden = original.text_encoder.config.hidden_size
    blocks = {k.split(".")[4] for k in ldm_state if k.startswith(TEXT_PREFIX + "transformer.resblocks.")}
    # One block more than the diffusers model: SD 2 conditions on OpenCLIP's penultimate block.
    assert blocks == {str(i) for i in range(layers + 1)}
    fused = ldm_state[TEXT_PREFIX + "transformer.resblocks.0.attn.in_proj_weight"]
    attn = original.text_encoder.state_dict()
    prefix = "text_model." if "text_model.embeddings.token_embedding.weight" in attn else ""
    q, k, v = (attn[f"{prefix}encoder.layers.0.self_attn.{p}_proj.weight"] for p in "qkv")
    assert fused.shape == (3 * hidden, hidden)
    assert torch.equal(fused, torch.cat([q, k, v]))
    assert ldm_state[TEXT_PREFIX + "positional_embedding"].shape == (77, hidden)
    assert sum(k.startswith(UNET_PREFIX) for k in ldm_state) == len(original.unet.state_dict())
    assert sum(k.startswith(VAE_PREFIX) for k in ldm_state) == len(original.vae.state_dict())


# --- round trip: pipeline -> LDM checkpoint -> our loader -> the same pixels ----------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_round_trip_gives_the_same_pixels(
    suffix: str,
    original: Any,
    ldm_state: dict[str, torch.Tensor],
    tiny_config_dir: Path,
    cache_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = tmp_path / f"v2-1_768-ema-pruned{suffix}"
    if suffix == ".safetensors":
        save_safetensors(ldm_state, path)
    else:
        save_ckpt(ldm_state, path)
    # Every unpickling of the .ckpt (ours and diffusers') must be weights-only.
    loads: list[object] = []
    real_load = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)

    loaded = _load_single_file(path, cache_dir, _common(), config_dir=tiny_config_dir)
    loaded.set_progress_bar_config(disable=True)

    if suffix == ".ckpt":
        assert loads and all(w is True for w in loads), loads
    else:
        assert loads == []
    for component in ("unet", "vae", "text_encoder"):
        want, got = getattr(original, component).state_dict(), getattr(loaded, component).state_dict()
        assert want.keys() == got.keys(), component
        assert all(torch.equal(want[k], got[k]) for k in want), component
    assert dict(loaded.scheduler.config) == dict(original.scheduler.config)
    assert loaded.tokenizer(PROMPT).input_ids == original.tokenizer(PROMPT).input_ids
    expected = _generate(original)
    image = _generate(loaded)
    assert image.shape == (1, 64, 64, 3)
    assert np.array_equal(image, expected)


def test_missing_text_encoder_block_is_named(
    ldm_state: dict[str, torch.Tensor], tiny_config_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    partial = {k: v for k, v in ldm_state.items() if ".resblocks.1." not in k}
    path = save_safetensors(partial, tmp_path / "partial.safetensors")
    with pytest.raises(ModelLoadError) as err:
        _load_single_file(path, cache_dir, _common(), config_dir=tiny_config_dir)
    assert str(path) in str(err.value)
    assert "text_encoder" in str(err.value) and "encoder.layers.1." in str(err.value)


def test_missing_unet_weights_are_refused(
    ldm_state: dict[str, torch.Tensor], tiny_config_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    partial = {k: v for k, v in ldm_state.items() if not k.startswith(UNET_PREFIX + "out.2.")}
    path = save_ckpt(partial, tmp_path / "partial.ckpt")
    with pytest.raises(ModelLoadError) as err:
        _load_single_file(path, cache_dir, _common(), config_dir=tiny_config_dir)
    assert str(path) in str(err.value) and "lacks UNet or VAE weights" in str(err.value)


# --- .ckpt files are only ever unpickled weights-only ---------------------------------------------


def _run_payload(marker: str) -> None:
    """What a malicious checkpoint would run when unpickled: here it only leaves a file behind."""
    Path(marker).write_text("code ran")


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (_run_payload, (self.marker,))


class _PlainObject:
    """An ordinary class instance: still a reference to importable code, so refused too."""

    def __init__(self) -> None:
        self.note = "trained with love"


@pytest.mark.parametrize(
    ("extra", "found"),
    [("payload", "test_single_file._run_payload"), ("object", "test_single_file._PlainObject")],
)
def test_ckpt_with_code_references_is_refused_without_running_it(
    extra: str, found: str, ldm_state: dict[str, torch.Tensor], cache_dir: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "v2-1_768-ema-pruned.ckpt"
    save_ckpt(ldm_state, path, callbacks=_Payload(marker) if extra == "payload" else _PlainObject())

    with pytest.raises(ModelLoadError) as err:
        _load_production(path, cache_dir)
    message = str(err.value)
    assert str(path) in message and "weights-only" in message and found in message
    assert not marker.exists()

    if extra == "payload":  # the payload is live: a full unpickle would have run it
        torch.load(path, weights_only=False)
        assert marker.read_text() == "code ran"


# --- other model families and broken files ---------------------------------------------------------


def _tensors(*names: str, shape: tuple[int, ...] = (4, 4)) -> dict[str, torch.Tensor]:
    return {n: torch.zeros(shape) for n in names}


def _sd2_like(replace: dict[str, tuple[int, ...]] | None = None, text_blocks: int = 24) -> dict[str, torch.Tensor]:
    """A skeleton with SD 2.x's prefixes and widths; ``replace`` overrides shapes by name."""
    shapes: dict[str, tuple[int, ...]] = {
        UNET_PREFIX + "input_blocks.0.0.weight": (320, 4, 3, 3),
        UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        VAE_PREFIX + "encoder.conv_in.weight": (128, 3, 3, 3),
        TEXT_PREFIX + "token_embedding.weight": (16, 1024),  # only the width is checked
    }
    shapes.update({f"{TEXT_PREFIX}transformer.resblocks.{i}.ln_1.weight": (1024,) for i in range(text_blocks)})
    shapes.update(replace or {})
    return {k: torch.zeros(v) for k, v in shapes.items()}


SD1 = _tensors(
    UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
    VAE_PREFIX + "encoder.conv_in.weight",
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
)
SDXL = _tensors(
    UNET_PREFIX + "label_emb.0.0.weight",
    VAE_PREFIX + "encoder.conv_in.weight",
    "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
    "conditioner.embedders.1.model.positional_embedding",
)


@pytest.mark.parametrize(
    ("name", "state", "said"),
    [
        ("sd15.safetensors", SD1, ["Stable Diffusion 1.x", "cond_stage_model.transformer"]),
        ("sd15.ckpt", SD1, ["Stable Diffusion 1.x", "cond_stage_model.transformer"]),
        ("sdxl.safetensors", SDXL, ["SDXL", "conditioner.embedders"]),
        ("sdxl.ckpt", SDXL, ["SDXL", "conditioner.embedders"]),
        (
            "inpaint.safetensors",
            _sd2_like({UNET_PREFIX + "input_blocks.0.0.weight": (320, 9, 3, 3)}),
            ["9 input channels", "inpainting", "takes 4"],
        ),
        (
            "sd1-unet.safetensors",
            _sd2_like({UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768)}),
            ["768-wide", "SD 1.x", "1024"],
        ),
        (
            "short-text.safetensors",
            _sd2_like(text_blocks=13),
            ["text encoder has 13 transformer blocks", "at least 23"],
        ),
        ("unet.safetensors", _tensors("down_blocks.0.resnets.0.conv1.weight"), ["diffusers format"]),
        ("other.safetensors", _tensors("double_blocks.0.img_attn.qkv.weight"), ["no UNet", "double_blocks"]),
    ],
)
def test_other_models_are_refused_saying_what_was_found(
    name: str, state: dict[str, torch.Tensor], said: list[str], cache_dir: Path, tmp_path: Path
) -> None:
    path = tmp_path / name
    if name.endswith(".ckpt"):
        save_ckpt(state, path)
    else:
        save_safetensors(state, path)
    with pytest.raises(ModelLoadError) as err:
        _load_production(path, cache_dir)
    message = str(err.value)
    assert message.startswith(f"{path}: ")
    for words in said:
        assert words in message


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_truncated_checkpoint_is_refused(
    suffix: str, ldm_state: dict[str, torch.Tensor], cache_dir: Path, tmp_path: Path
) -> None:
    path = tmp_path / f"v2-1_768-ema-pruned{suffix}"
    if suffix == ".safetensors":
        save_safetensors(ldm_state, path)
    else:
        save_ckpt(ldm_state, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError) as err:
        _load_production(path, cache_dir)
    assert str(err.value).startswith(f"{path}: ")
    assert "truncated" in str(err.value)


def test_garbage_ckpt_is_refused(cache_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ModelLoadError) as err:
        _load_production(path, cache_dir)
    assert str(err.value).startswith(f"{path}: ") and "weights-only" in str(err.value)


# --- the production configs --------------------------------------------------------------------------


@pytest.mark.slow
def test_full_size_checkpoint_loads_with_the_packaged_configs(cache_dir: Path, tmp_path: Path) -> None:
    """A full-size SD 2.1 checkpoint (all-zero weights, sparse on disk) through the production path."""
    shapes = full_size_ldm_shapes()
    # Names and shapes of the real v2-1_768-ema-pruned checkpoint's layout.
    assert shapes[UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 1024)
    assert shapes[UNET_PREFIX + "input_blocks.3.0.op.weight"] == (320, 320, 3, 3)
    assert shapes[UNET_PREFIX + "output_blocks.2.1.conv.weight"] == (1280, 1280, 3, 3)
    assert shapes[UNET_PREFIX + "output_blocks.5.2.conv.weight"] == (1280, 1280, 3, 3)
    assert shapes[UNET_PREFIX + "middle_block.1.proj_in.weight"] == (1280, 1280)
    assert shapes[VAE_PREFIX + "encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert shapes[VAE_PREFIX + "decoder.up.3.upsample.conv.weight"] == (512, 512, 3, 3)
    assert shapes[TEXT_PREFIX + "transformer.resblocks.23.attn.in_proj_weight"] == (3072, 1024)
    assert shapes[TEXT_PREFIX + "text_projection"] == (1024, 1024)
    weights = sum(math.prod(s) for k, s in shapes.items() if k.startswith((UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX)))
    extra_block = 12 * 1024**2 + 13 * 1024 + 1024**2  # resblocks.23 and text_projection, not loaded
    assert weights - extra_block == 865_910_724 + 83_653_863 + 340_387_840

    # fp32 like the real file (5.2 GB), sparse: no disk or memory is spent on the zeros.
    path = write_sparse_safetensors(shapes, tmp_path / "v2-1_768-ema-pruned.safetensors", dtype="F32")
    pipe = _load_production(path, cache_dir)

    counts = [sum(p.numel() for p in getattr(pipe, c).parameters()) for c in ("unet", "vae", "text_encoder")]
    assert counts == [865_910_724, 83_653_863, 340_387_840]
    assert pipe.unet.config.upcast_attention is True  # from the packaged diffusers config, not the yaml
    assert pipe.unet.config.cross_attention_dim == 1024 and pipe.unet.config.sample_size == 96
    assert pipe.text_encoder.config.num_hidden_layers == 23
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.tokenizer.pad_token_id == 0 and pipe.tokenizer.model_max_length == 77
    assert pipe.tokenizer("a fox").input_ids == [49406, 320, 3240, 49407]
