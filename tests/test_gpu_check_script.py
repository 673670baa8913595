"""benchmarks/gpu_check.sh's DeepSpeed step, with a fake ``python3``: the GPU machine loads the carried
pre-built ops when they load, and otherwise falls back to the pure-Python DeepSpeed and builds them there.

The real script runs on a GPU machine only; this checks its control flow, which decides whether ~2 of its
9 minutes go to an nvcc build.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Answers what the script asks python3, and logs every call. The ops load fails while the carried
# pre-built wheel is the one installed and FAIL_PREBUILT is set (an ABI mismatch on the GPU machine).
FAKE_PYTHON = """#!/bin/sh
echo "$*" >> "$CALLS"
case "$*" in
  *"get_device_capability"*) echo "$CAPABILITY" ;;
  *"pip install"*"ops/deepspeed-"*) echo prebuilt > "$STATE" ;;
  *"pip install"*"deepspeed-"*) echo pure > "$STATE" ;;
  *"InferenceBuilder().load()"*)
    if [ "$(cat "$STATE" 2>/dev/null)" = prebuilt ] && [ -n "$FAIL_PREBUILT" ]; then
      echo "ImportError: undefined symbol"; exit 1
    fi
    echo "DeepSpeed ops loaded" ;;
esac
exit 0
"""


def run_check(
    tmp_path: Path, *, carried_ops: bool, fail_prebuilt: bool, capability: str = "9.0"
) -> tuple[str, list[str]]:
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    shutil.copy(REPO / "benchmarks" / "gpu_check.sh", repo / "benchmarks" / "gpu_check.sh")
    wheels = repo / ".whl"
    (wheels / "ops").mkdir(parents=True)
    (wheels / "deepspeed-0.19.8-py3-none-any.whl").write_bytes(b"")
    if carried_ops:
        (wheels / "ops" / "deepspeed-0.19.8-cp312-cp312-linux_x86_64.whl").write_bytes(b"")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("python3", FAKE_PYTHON), ("nvidia-smi", "#!/bin/sh\necho 'NVIDIA H200, 143771 MiB'\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "calls"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "CALLS": str(calls),
        "STATE": str(tmp_path / "state"),
        "OUT": str(tmp_path / "out"),
        "GPU_CHECK_SITE": str(tmp_path / "site"),
        "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"),
        "GPU_CHECK_TESTS": "0",
        "FAIL_PREBUILT": "1" if fail_prebuilt else "",
        "CAPABILITY": capability,
    }
    done = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "run"], cwd=repo, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return (tmp_path / "out" / "gpu_check.log").read_text(), calls.read_text().splitlines()


def test_the_carried_prebuilt_ops_are_used_when_they_load(tmp_path: Path) -> None:
    log, calls = run_check(tmp_path, carried_ops=True, fail_prebuilt=False)
    assert "DeepSpeed ops pre-built (carried): yes" in log
    assert "DeepSpeed ops: build" not in log  # no nvcc build on the GPU machine's time
    loads = [c for c in calls if "InferenceBuilder().load()" in c]
    assert len(loads) == 1
    # The benchmark runs after the ops step, against what was installed there.
    assert any("benchmarks/gpu.py" in c for c in calls[calls.index(loads[0]) :])


@pytest.mark.parametrize("carried_ops", [True, False])
def test_without_loadable_prebuilt_ops_the_pure_deepspeed_builds_them(tmp_path: Path, carried_ops: bool) -> None:
    log, calls = run_check(tmp_path, carried_ops=carried_ops, fail_prebuilt=True)
    assert "DeepSpeed ops: build for sm_90" in log
    if carried_ops:
        assert "DeepSpeed ops pre-built (carried): no (ImportError: undefined symbol)" in log
        installs = [c for c in calls if "pip install" in c and "deepspeed-" in c]
        # The pure-Python wheel goes back over the failed pre-built one before the build.
        assert "ops/deepspeed-" in installs[-2] and "deepspeed-0.19.8-py3-none-any.whl" in installs[-1]
    else:
        assert "pre-built (carried)" not in log
    assert (tmp_path / "state").read_text().strip() == "pure"
    assert "DeepSpeed op build exit 0 (DeepSpeed ops loaded)" in log


def test_the_carried_ops_are_for_hopper_only(tmp_path: Path) -> None:
    """fetch builds them for sm_90 without PTX: on an A100 they would load and then have no kernel to run."""
    log, calls = run_check(tmp_path, carried_ops=True, fail_prebuilt=False, capability="8.0")
    assert "pre-built (carried)" not in log
    assert not any("ops/deepspeed-" in c for c in calls)
    assert "DeepSpeed ops: build for sm_80" in log
