"""The emulator's verdicts: a deterministic policy of words, blocklists and image rules (JSON)."""

from __future__ import annotations

import hashlib
import io
import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aacs_emulator.limits import CATEGORIES

# The built-in policy: a few plain words per category, so the emulator blocks something out of the box.
DEFAULT_POLICY: dict[str, Any] = {
    "text": {
        "terms": [
            {"term": "hateful", "category": "Hate", "severity": 2},
            {"term": "racist", "category": "Hate", "severity": 4},
            {"term": "self-harm", "category": "SelfHarm", "severity": 4},
            {"term": "suicide", "category": "SelfHarm", "severity": 4},
            {"term": "explicit", "category": "Sexual", "severity": 2},
            {"term": "nsfw", "category": "Sexual", "severity": 4},
            {"term": "nude", "category": "Sexual", "severity": 4},
            {"term": "bloody", "category": "Violence", "severity": 2},
            {"term": "gore", "category": "Violence", "severity": 4},
            {"term": "massacre", "category": "Violence", "severity": 6},
        ]
    },
    "blocklists": {"demo-blocklist": ["forbidden phrase"]},
    "image": {"rules": []},
}


class PolicyError(ValueError):
    """The policy document is invalid; the message names the offending path."""


def _word_pattern(term: str) -> re.Pattern[str]:
    # Whole words, case-insensitive: "gore" matches "Gore!" but not "gorge"; inner spaces match any run.
    body = r"\s+".join(re.escape(part) for part in term.split())
    return re.compile(rf"(?<!\w){body}(?!\w)", re.IGNORECASE)


def _canonical_category(value: Any, where: str) -> str:
    for name in CATEGORIES:
        if isinstance(value, str) and value.lower() == name.lower():
            return name
    raise PolicyError(f"{where}: must be one of {', '.join(CATEGORIES)} (got {value!r})")


def _severity(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 7:
        raise PolicyError(f"{where}: must be an integer from 0 to 7 (got {value!r})")
    return value


def _severities(value: Any, where: str) -> dict[str, int]:
    if not isinstance(value, dict) or not value:
        raise PolicyError(f'{where}: must be an object of category -> severity, e.g. {{"Violence": 4}}')
    return {_canonical_category(k, f"{where} key"): _severity(v, f"{where}.{k}") for k, v in value.items()}


@dataclass(frozen=True)
class TermRule:
    term: str
    category: str
    severity: int
    pattern: re.Pattern[str]


@dataclass(frozen=True)
class BlocklistItem:
    blocklist: str
    item_id: str
    text: str
    pattern: re.Pattern[str]


@dataclass(frozen=True)
class ImageRule:
    """One image rule: ``all``, a set of SHA-256 digests of the image bytes, or a mean RGB colour."""

    severities: dict[str, int]
    all: bool = False
    sha256: frozenset[str] = frozenset()
    mean_color: tuple[float, float, float] | None = None
    tolerance: float = 0.0

    def matches(self, digest: str, mean: tuple[float, float, float]) -> bool:
        if self.all:
            return True
        if self.sha256:
            return digest in self.sha256
        assert self.mean_color is not None
        return max(abs(a - b) for a, b in zip(mean, self.mean_color, strict=True)) <= self.tolerance


@dataclass(frozen=True)
class Policy:
    """What the emulator finds in text and images. Deterministic: same input, same answer.

    * Text: each term matches whole words, case-insensitively; a category's severity is the highest of its
      matching terms (0 when none match).
    * Blocklists: named lists of items matched the same way; a request's ``blocklistNames`` select them.
    * Images: each rule that matches contributes its severities; a category takes the highest (0 if none).

    Severities are on the 0-7 scale. ``FourSeverityLevels`` answers (the default, and the only image scale)
    round down to 0, 2, 4 or 6, as the service does.
    """

    terms: tuple[TermRule, ...] = ()
    blocklists: Mapping[str, tuple[BlocklistItem, ...]] = field(default_factory=dict)
    image_rules: tuple[ImageRule, ...] = ()

    @classmethod
    def from_dict(cls, doc: Any) -> Policy:
        if not isinstance(doc, dict):
            raise PolicyError("policy: must be a JSON object with 'text', 'blocklists' and/or 'image'")
        unknown = set(doc) - {"text", "blocklists", "image", "description"}
        if unknown:
            raise PolicyError(f"policy: unknown keys {sorted(unknown)}; allowed: text, blocklists, image")
        terms = []
        for i, rule in enumerate((doc.get("text") or {}).get("terms", [])):
            where = f"text.terms[{i}]"
            if not isinstance(rule, dict) or not isinstance(rule.get("term"), str) or not rule["term"].strip():
                raise PolicyError(f'{where}: must be {{"term": str, "category": str, "severity": int}}')
            term = rule["term"].strip()
            terms.append(
                TermRule(
                    term,
                    _canonical_category(rule.get("category"), f"{where}.category"),
                    _severity(rule.get("severity"), f"{where}.severity"),
                    _word_pattern(term),
                )
            )
        blocklists: dict[str, tuple[BlocklistItem, ...]] = {}
        for name, items in (doc.get("blocklists") or {}).items():
            if not re.fullmatch(r"[0-9A-Za-z._~-]{1,64}", name):
                raise PolicyError(f"blocklists: {name!r} is not a blocklist name (1-64 of A-Z a-z 0-9 . _ ~ -)")
            if not isinstance(items, list) or not all(isinstance(t, str) and t.strip() for t in items):
                raise PolicyError(f"blocklists.{name}: must be a list of non-empty strings")
            blocklists[name] = tuple(
                BlocklistItem(name, str(uuid.uuid5(uuid.NAMESPACE_URL, f"{name}/{t}")), t, _word_pattern(t.strip()))
                for t in items
            )
        rules = [
            _image_rule(rule, f"image.rules[{i}]") for i, rule in enumerate((doc.get("image") or {}).get("rules", []))
        ]
        return cls(tuple(terms), blocklists, tuple(rules))

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise PolicyError(f"policy file {path}: {exc}") from None
        try:
            return cls.from_dict(doc)
        except PolicyError as exc:
            raise PolicyError(f"policy file {path}: {exc}") from None

    @classmethod
    def default(cls) -> Policy:
        return cls.from_dict(DEFAULT_POLICY)

    def text_severities(self, text: str) -> dict[str, int]:
        found = dict.fromkeys(CATEGORIES, 0)
        for rule in self.terms:
            if rule.severity > found[rule.category] and rule.pattern.search(text):
                found[rule.category] = rule.severity
        return found

    def blocklist_matches(self, text: str, names: list[str]) -> list[BlocklistItem]:
        return [item for name in names for item in self.blocklists[name] if item.pattern.search(text)]

    def image_severities(self, digest: str, mean: tuple[float, float, float]) -> dict[str, int]:
        found = dict.fromkeys(CATEGORIES, 0)
        for rule in self.image_rules:
            if rule.matches(digest, mean):
                for name, value in rule.severities.items():
                    found[name] = max(found[name], value)
        return found


def _image_rule(rule: Any, where: str) -> ImageRule:
    """One entry of ``image.rules``: exactly one of ``all``, ``sha256`` or ``mean_color``, with severities."""
    if not isinstance(rule, dict):
        raise PolicyError(f"{where}: must be an object")
    kinds = [k for k in ("all", "sha256", "mean_color") if k in rule]
    if len(kinds) != 1:
        raise PolicyError(f"{where}: needs exactly one of 'all', 'sha256', 'mean_color'")
    severities = _severities(rule.get("severities"), f"{where}.severities")
    if kinds == ["all"]:
        if rule["all"] is not True:
            raise PolicyError(f"{where}.all: must be true")
        return ImageRule(severities, all=True)
    if kinds == ["sha256"]:
        digests = rule["sha256"]
        if isinstance(digests, str):
            digests = [digests]
        if not isinstance(digests, list) or not all(
            isinstance(d, str) and re.fullmatch(r"[0-9a-fA-F]{64}", d) for d in digests
        ):
            raise PolicyError(f"{where}.sha256: must be a hex SHA-256 digest or a list of them")
        return ImageRule(severities, sha256=frozenset(d.lower() for d in digests))
    color = rule["mean_color"]
    tolerance = rule.get("tolerance", 0)
    if (
        not isinstance(color, list)
        or len(color) != 3
        or not all(isinstance(c, (int, float)) and 0 <= c <= 255 for c in color)
    ):
        raise PolicyError(f"{where}.mean_color: must be [r, g, b] with values 0-255")
    if not isinstance(tolerance, (int, float)) or tolerance < 0:
        raise PolicyError(f"{where}.tolerance: must be a number >= 0")
    mean = (float(color[0]), float(color[1]), float(color[2]))
    return ImageRule(severities, mean_color=mean, tolerance=float(tolerance))


def image_fingerprint(data: bytes) -> tuple[str, tuple[float, float, float]]:
    """(SHA-256 of the bytes, mean RGB colour): what the image rules match on."""
    from PIL import Image, ImageStat

    with Image.open(io.BytesIO(data)) as im:
        mean = ImageStat.Stat(im.convert("RGB")).mean
    return hashlib.sha256(data).hexdigest(), (float(mean[0]), float(mean[1]), float(mean[2]))
