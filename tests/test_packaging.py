"""What the built wheels contain: the product wheel holds sd_endpoint only (no emulator, no test code), and
the AACS emulator is its own distribution with its own command. Built offline from a copy of the sources.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")

pytestmark = pytest.mark.slow


def build_wheel(project: Path, out: Path) -> dict[str, str]:
    """Build ``project``'s wheel; {file name: text} of its members (only the metadata texts are read)."""
    # --no-build-isolation: the venv's setuptools, so no package index is needed.
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out)]
    subprocess.run([*cmd, str(project)], check=True, timeout=600, capture_output=True)
    (wheel,) = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        return {n: zf.read(n).decode() if ".dist-info/" in n else "" for n in zf.namelist()}


def top_level(names: dict[str, str]) -> set[str]:
    return {n.split("/", 1)[0] for n in names if ".dist-info/" not in n}


def member(names: dict[str, str], suffix: str) -> str:
    return next(text for n, text in names.items() if n.endswith(".dist-info/" + suffix))


def test_the_product_wheel_has_no_emulator_and_no_test_code(tmp_path: Path) -> None:
    # A copy, so that the build writes nothing into the checkout; tests/ comes along so that leaving it out
    # is what is tested.
    repo = tmp_path / "repo"
    for folder in ("src", "tests"):
        shutil.copytree(REPO / folder, repo / folder, ignore=IGNORE)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, repo / name)
    names = build_wheel(repo, tmp_path / "dist")
    assert top_level(names) == {"sd_endpoint"}
    assert [n for n in names if "emulator" in n] == []
    assert [n for n in names if "/test_" in n or n.endswith("conftest.py") or "/tests/" in n] == []
    assert "sd_endpoint/model/sd21_config/unet/config.json" in names  # package data still ships
    assert "sd_endpoint/server/static/playground.html" in names  # GET /playground serves it from the package
    assert "aacs" not in member(names, "entry_points.txt")


def test_the_emulator_is_its_own_distribution_with_its_own_command(tmp_path: Path) -> None:
    project = tmp_path / "aacs_emulator"
    shutil.copytree(REPO / "src" / "aacs_emulator", project, ignore=IGNORE)
    names = build_wheel(project, tmp_path / "dist")
    assert top_level(names) == {"aacs_emulator"}
    assert {"aacs_emulator/server.py", "aacs_emulator/__main__.py", "aacs_emulator/py.typed"} <= set(names)
    assert "aacs-emulator = aacs_emulator.cli:main" in member(names, "entry_points.txt")
    requires = [line for line in member(names, "METADATA").splitlines() if line.startswith("Requires-Dist:")]
    assert requires == ["Requires-Dist: pillow>=10.0"]  # usable without the product package
