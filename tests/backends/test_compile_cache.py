"""The persistent compile cache is used only by what filled it; the torch setup step owns global settings."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sd_endpoint.backends import compile_cache
from sd_endpoint.backends.diffusers_backend import DiffusersBackend
from sd_endpoint.backends.torch_setup import compile_wanted, prepare
from sd_endpoint.errors import ConfigError
from sd_endpoint.settings import load_settings


def test_a_cache_from_another_gpu_torch_or_model_is_rebuilt_never_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "unchanged")
    monkeypatch.setenv("TRITON_CACHE_DIR", "unchanged")
    key = {"device": "NVIDIA H200 sm_90", "torch": "2.13.0", "model": "abc", "precision": "fp16"}
    first = compile_cache.open_cache(tmp_path, key)
    assert first.state == "new" and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    (tmp_path / "inductor").mkdir(exist_ok=True)  # importing inductor may create it
    (tmp_path / "inductor" / "graph").write_text("compiled")
    assert compile_cache.open_cache(tmp_path, key).state == "warm"
    assert (tmp_path / "inductor" / "graph").exists()  # a matching cache is kept
    other = {**key, "device": "NVIDIA A100 sm_80"}
    assert compile_cache.open_cache(tmp_path, other).state == "rebuilt"
    assert not (tmp_path / "inductor" / "graph").exists()
    assert json.loads((tmp_path / "key.json").read_text()) == other


def test_cache_key_names_device_torch_and_model(backend: DiffusersBackend) -> None:
    a = compile_cache.cache_key(backend.raw_unet, source="diffusers:/m", precision="fp16")
    assert a["device"] == "cpu" and a["torch"].startswith("2.")
    assert compile_cache.cache_key(backend.raw_unet, source="diffusers:/other", precision="fp16")["model"] != a["model"]
    assert compile_cache.cache_key(backend.raw_unet, source="diffusers:/m", precision="fp8") != a


@pytest.mark.parametrize(
    ("setting", "device", "wanted"),
    [("auto", "cuda", True), ("auto", "cpu", False), ("on", "cpu", True), ("off", "cuda", False)],
)
def test_compile_auto_means_cuda_only(setting: str, device: str, wanted: bool) -> None:
    assert compile_wanted(setting, device) is wanted


def test_compile_setting_takes_words_and_booleans() -> None:
    assert load_settings(compile="true").compile == "on"
    assert load_settings(compile="0").compile == "off"
    assert load_settings().compile == "auto"
    with pytest.raises(ConfigError, match="SD_ENDPOINT_COMPILE"):
        load_settings(compile="sometimes")


def test_prepare_on_cpu_compiles_nothing_and_refuses_fp8(backend: DiffusersBackend, tmp_path: Path) -> None:
    settings = load_settings(cache_dir=tmp_path)
    prepared = prepare(settings, backend.pipe)
    assert not prepared.compile and prepared.cache is None and not (tmp_path / "compile").exists()
    with pytest.raises(ConfigError, match="fp8"):
        prepare(load_settings(cache_dir=tmp_path, precision="fp8"), backend.pipe)
    on = prepare(load_settings(cache_dir=tmp_path, compile="on"), backend.pipe, source="x")
    assert on.compile and on.cache is not None and (tmp_path / "compile" / "key.json").is_file()
