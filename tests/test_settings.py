"""Settings come from the environment; every error names the variable."""

from __future__ import annotations

import pytest

from sd_endpoint.errors import ConfigError
from sd_endpoint.settings import ContentSafetySettings, Settings, load, load_settings


def test_env_prefix_and_azure_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SD_ENDPOINT_MAX_IMAGES_PER_REQUEST", "3")
    monkeypatch.setenv("AZUREML_MODEL_DIR", "/models")
    monkeypatch.setenv("SD_ENDPOINT_KEYS", "primary-key, secondary-key")
    s = load_settings()
    assert s.max_images_per_request == 3
    assert str(s.azureml_model_dir) == "/models"
    assert [k.get_secret_value() for k in s.keys] == ["primary-key", "secondary-key"]
    assert "primary-key" not in repr(s)  # SecretStr keeps keys out of reprs and logs


@pytest.mark.parametrize(
    ("var", "value", "named"),
    [
        ("SD_ENDPOINT_MAX_STEPS", "lots", "SD_ENDPOINT_MAX_STEPS"),
        ("SD_ENDPOINT_DEVICE", "tpu", "SD_ENDPOINT_DEVICE"),
        ("SD_ENDPOINT_DTYPE", "float8", "SD_ENDPOINT_DTYPE"),
        ("SD_ENDPOINT_BACKEND", "onnx", "SD_ENDPOINT_BACKEND"),
        ("SD_ENDPOINT_PORT", "70000", "SD_ENDPOINT_PORT"),
        ("SD_ENDPOINT_DEFAULT_HEIGHT", "100", "SD_ENDPOINT_DEFAULT_HEIGHT"),
    ],
)
def test_bad_values_name_the_variable(monkeypatch: pytest.MonkeyPatch, var: str, value: str, named: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert named in str(info.value)


def test_content_safety_threshold_uses_azure_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONTENT_SAFETY_THRESHOLD", "high")
    with pytest.raises(ConfigError, match="CONTENT_SAFETY_THRESHOLD"):
        load(ContentSafetySettings)


def test_defaults_fit_azure_request_settings() -> None:
    s = Settings()
    # Below the deployment's request_timeout_ms (90 s in Azure's samples) so our 408 comes first.
    assert s.request_timeout_ms < 90_000
    assert s.device == "auto" and s.dtype == "auto" and s.backend == "auto"
