"""The README's configuration table, generated from the settings classes (one source of truth).

``python -m sd_endpoint.config_reference`` prints it; tests/test_config_reference.py fails when the README's
copy is out of date.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings

START = "<!-- settings-table:start -->"
END = "<!-- settings-table:end -->"


def _classes() -> list[tuple[str, type[BaseSettings]]]:
    from sd_endpoint.batch import BatchSettings
    from sd_endpoint.settings import ContentSafetySettings, Settings

    return [("Endpoint", Settings), ("Content safety", ContentSafetySettings), ("Batch", BatchSettings)]


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        value: Any = info.default_factory()  # type: ignore[call-arg]
        if isinstance(value, (list, dict)) and not value:
            return "(none)"
        return "(see description)" if not isinstance(value, (int, float, str, bool)) else f"`{value}`"
    if info.default is PydanticUndefined or info.default is None:
        return "(none)"
    if isinstance(info.default, bool):
        return f"`{str(info.default).lower()}`"
    return f"`{json.dumps(info.default) if isinstance(info.default, str) else info.default}`"


def markdown_table() -> str:
    from sd_endpoint.settings import env_name

    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for group, cls in _classes():
        lines.append(f"| **{group}** | | |")
        for field, info in cls.model_fields.items():
            if field == "log_prompts" and group != "Endpoint":
                continue  # the same SD_ENDPOINT_LOG_PROMPTS, read by the screener too
            desc = (info.description or "").replace("|", "\\|")
            lines.append(f"| `{env_name(cls, field)}` | {_default(info)} | {desc} |")
    return "\n".join(lines)


def readme_block() -> str:
    return f"{START}\n{markdown_table()}\n{END}"


if __name__ == "__main__":
    print(readme_block())  # noqa: T201
