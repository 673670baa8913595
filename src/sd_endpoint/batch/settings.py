"""Batch-only settings (``SD_ENDPOINT_BATCH_*``); generation settings are the server's ``SD_ENDPOINT_*``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class BatchSettings(BaseSettings):
    """Batch-only settings (``SD_ENDPOINT_BATCH_*``); generation settings are the server's ``SD_ENDPOINT_*``."""

    model_config = SettingsConfigDict(env_prefix="SD_ENDPOINT_BATCH_", extra="ignore", populate_by_name=True)

    parameters: Annotated[dict[str, Any], NoDecode] = Field(
        default_factory=dict, description="Generation parameters for every row, as JSON (the request's parameters)."
    )
    fail_on_bad_input: bool = Field(
        default=False, description="Fail the mini-batch (after writing its good rows) when a file or row is bad."
    )
    python: str | None = Field(
        default=None, description="Run generation in this interpreter (the image's sd-endpoint environment)."
    )
    output_path: Path | None = Field(
        default=None,
        validation_alias=AliasChoices("AZUREML_BI_OUTPUT_PATH", "output_path"),
        description="Set by Azure ML: the job's output folder.",
    )

    @field_validator("parameters", mode="before")
    @classmethod
    def _json_object(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else {}
            except json.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON ({exc})") from None
            if not isinstance(value, dict):
                raise ValueError('expected a JSON object, e.g. {"num_inference_steps": 30}')
        return value
