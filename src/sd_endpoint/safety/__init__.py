"""Content screening (Azure AI Content Safety)."""

from __future__ import annotations

from sd_endpoint.safety.base import NullScreener, Screener, Verdict
from sd_endpoint.settings import ContentSafetySettings

__all__ = ["NullScreener", "Screener", "Verdict", "build_screener"]


def build_screener(settings: ContentSafetySettings) -> Screener:
    """The screening stage the settings ask for; NullScreener when CONTENT_SAFETY_ENDPOINT is unset."""
    if not settings.enabled:
        return NullScreener()
    from sd_endpoint.safety.aacs import AzureContentSafetyScreener

    screener: Screener = AzureContentSafetyScreener.from_settings(settings)
    return screener
