"""The GPU environments' pins (environment/) against the one source of truth (constraints.txt, pyproject.toml)."""

from __future__ import annotations

import importlib
import re
import subprocess
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
ENV = REPO / "environment"


def pins(path: Path) -> dict[str, Version]:
    """name -> version of every requirement line; each must be an exact pin."""
    out: dict[str, Version] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"{path.name}: {line!r} is not an exact pin"
        name = canonicalize_name(req.name)
        assert name not in out, f"{path.name}: {req.name} is pinned twice"
        out[name] = Version(specs[0].version)
    return out


def pyproject() -> dict[str, object]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def requirements(group: str | None = None) -> list[Requirement]:
    project = pyproject()["project"]
    assert isinstance(project, dict)
    items = project["dependencies"] if group is None else project["optional-dependencies"][group]
    return [Requirement(r) for r in items]


CPU = pins(REPO / "constraints.txt")
GPU = pins(ENV / "constraints-gpu.txt")


def test_gpu_pins_never_contradict_the_tested_set() -> None:
    both = sorted(set(CPU) & set(GPU))
    assert [(n, CPU[n], GPU[n]) for n in both if CPU[n] != GPU[n]] == []
    # torch's version comes only from constraints.txt (the image takes its CUDA build of the same version).
    assert "torch" in CPU and "torch" not in GPU


def test_gpu_extra_is_pinned_within_pyproject_ranges() -> None:
    gpu = requirements("gpu")
    assert {canonicalize_name(r.name) for r in gpu} == {"deepspeed", "deepspeed-mii", "torchao"}
    for req in gpu:
        name = canonicalize_name(req.name)
        version = GPU.get(name) or CPU[name]
        assert req.specifier.contains(version, prereleases=True), (req, version)


def test_every_declared_dependency_is_pinned_within_its_range() -> None:
    for req in requirements() + requirements("azureml") + requirements("dev"):
        name = canonicalize_name(req.name)
        assert name in CPU, f"{req.name} has no pin in constraints.txt"
        assert req.specifier.contains(CPU[name], prereleases=True), (str(req), str(CPU[name]))


def test_conda_environment_takes_every_version_from_the_pins() -> None:
    conda = yaml.safe_load((ENV / "conda.yaml").read_text())
    deps = conda["dependencies"]
    python = next(d for d in deps if isinstance(d, str) and d.startswith("python="))
    assert python == "python=3.11"
    # The same minor version everywhere: requires-python allows it, mypy checks for it, the torch wheel is cp311.
    project = pyproject()["project"]
    assert isinstance(project, dict)
    from packaging.specifiers import SpecifierSet

    assert SpecifierSet(project["requires-python"]).contains("3.11")
    assert pyproject()["tool"]["mypy"]["python_version"] == "3.11"  # type: ignore[index]
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    assert "-c ../constraints.txt" in pip and "-c constraints-gpu.txt" in pip
    assert "..[azureml,gpu]" in pip
    assert (ENV / "../constraints.txt").resolve().is_file() and (ENV / "../pyproject.toml").resolve().is_file()
    # No version is written here: a pin in two places drifts.
    assert not [line for line in pip if re.search(r"[=<>~]=", line)]
    index = next(line for line in pip if line.startswith("--extra-index-url"))
    assert index.endswith("/whl/cu128")


def test_dockerfiles_build_the_same_model_environment() -> None:
    online = (ENV / "Dockerfile").read_text()
    batch = (ENV / "Dockerfile.batch").read_text()
    base = re.compile(r"^ARG BASE_IMAGE=(\S+)$", re.M)
    assert (
        base.findall(online)
        == base.findall(batch)
        == ["mcr.microsoft.com/azureml/openmpi5.0-cuda12.8-ubuntu24.04:latest"]
    )
    # The base image's CUDA toolkit matches the torch build conda.yaml asks for (DeepSpeed compiles with it).
    assert "cuda12.8" in base.findall(online)[0] and "cu128" in (ENV / "conda.yaml").read_text()
    for text in (online, batch):
        assert 'conda env create -p "$SD_ENDPOINT_ENV" -f environment/conda.yaml' in text
        assert "SD_ENDPOINT_ENV=/opt/conda-envs/sd-endpoint" in text
    assert 'CMD ["/usr/local/bin/sd-endpoint-entrypoint"]' in online and "EXPOSE 5001" in online


def test_batch_driver_environment_is_separate_and_pinned() -> None:
    driver = pins(ENV / "batch-driver.txt")
    assert set(driver) == {"azureml-core", "azureml-dataset-runtime"}
    # Not in the model environment: their pins contradict it (see environment/batch-driver.txt).
    assert not set(driver) & (set(CPU) | set(GPU))
    batch = (ENV / "Dockerfile.batch").read_text()
    assert '"$BATCH_DRIVER_ENV/bin/pip" install -r environment/batch-driver.txt' in batch
    assert "SD_ENDPOINT_BATCH_PYTHON=/opt/conda-envs/sd-endpoint/bin/python" in batch
    assert "PATH=/opt/conda-envs/azureml-batch-driver/bin:$PATH" in batch


def test_setup_script_installs_through_the_same_constraints() -> None:
    setup = (REPO / "scripts/setup.sh").read_text()
    assert "-c constraints.txt" in setup


@pytest.mark.parametrize(
    ("family", "arch"),
    [("hopper", "9.0"), ("ada", "8.9"), ("ampere", "8.0;8.6"), ("turing", "7.5"), ("all", "7.5;8.0;8.6;8.9;9.0")],
)
def test_both_images_prebuild_deepspeed_ops_for_one_gpu_family(tmp_path: Path, family: str, arch: str) -> None:
    """The script both Dockerfiles run: pip gets one family's arch list and the two op switches, then the
    ops are checked to load (through the function auto itself uses)."""
    for dockerfile in ("Dockerfile", "Dockerfile.batch"):
        text = (ENV / dockerfile).read_text()
        assert re.search(r"^ARG GPU_FAMILY=\w+$", text, re.M)
        assert 'RUN sh environment/build-deepspeed-ops.sh "$SD_ENDPOINT_ENV/bin/python" "$GPU_FAMILY"' in text
        assert "TORCH_CUDA_ARCH_LIST" not in text  # one home for the arch lists: the script
    calls = tmp_path / "calls"
    fake_python = tmp_path / "python"
    fake_python.write_text(
        "#!/bin/sh\n"
        f'echo "$DS_ACCELERATOR|$TORCH_CUDA_ARCH_LIST|$DS_BUILD_TRANSFORMER_INFERENCE|$DS_BUILD_SPATIAL_INFERENCE|$*" '
        f">> {calls}\n"
    )
    fake_python.chmod(0o755)
    script = ENV / "build-deepspeed-ops.sh"
    subprocess.run(["sh", str(script), str(fake_python), family], check=True, capture_output=True, cwd=REPO)
    install, check = calls.read_text().splitlines()
    # cuda: the build machine has no GPU, where DeepSpeed would otherwise pick its CPU accelerator and build
    # no ops; no pip cache: a cached plain DeepSpeed wheel has no ops.
    assert install.startswith(f"cuda|{arch}|1|1|-m pip install ") and install.endswith("-c constraints.txt deepspeed")
    assert "--no-cache-dir" in install.split()
    # Then the ops check, through the function auto itself uses: it must still exist where the image looks.
    module, name = re.findall(r"from (\S+) import (\w+) as m; assert not m\(\), m\(\)$", check)[0]
    assert callable(getattr(importlib.import_module(module), name))
    bad = subprocess.run(["sh", str(script), str(fake_python), "volta"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 1 and "unknown GPU_FAMILY 'volta'" in bad.stderr


def test_the_images_default_gpu_family_is_the_deployments_gpu() -> None:
    """Azure builds the images through dockerfile_path, with no build arguments: ops built for another family
    than the deployments' instance type would be found, tried at every start and fail (no kernel image)."""
    family_of = {"A100": "ampere", "A10": "ampere", "H100": "hopper", "H200": "hopper", "T4": "turing", "L4": "ada"}
    instance_types = [
        yaml.safe_load((REPO / "deployment" / path).read_text())[key]
        for path, key in (
            ("online/deployment.yml", "instance_type"),
            ("online/safe-deployment.yml", "instance_type"),
            ("batch/compute.yml", "size"),
        )
    ]
    families = {family_of[re.search(r"_(A100|A10|H100|H200|T4|L4)", t).group(1)] for t in instance_types}  # type: ignore[union-attr]
    defaults = {
        re.findall(r"^ARG GPU_FAMILY=(\w+)$", (ENV / d).read_text(), re.M)[0]
        for d in ("Dockerfile", "Dockerfile.batch")
    }
    assert defaults == families, (instance_types, defaults)
