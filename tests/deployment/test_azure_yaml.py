"""The Azure ML YAML in deployment/, loaded offline by azure-ai-ml exactly as `az ml ... create -f` reads it.

Checks that every YAML parses into its entity class, that the paths it names exist (or, for the model, are
the documented local folder), that the code upload holds what the scripts need, and that request settings,
probes and environment variables agree with the server's own settings.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from azure.ai.ml import load_batch_endpoint, load_compute, load_online_deployment, load_online_endpoint
from azure.ai.ml._utils._asset_utils import get_ignore_file
from azure.ai.ml.entities import ManagedOnlineDeployment, ManagedOnlineEndpoint, ModelBatchDeployment
from azure.ai.ml.entities._load_functions import load_model_batch_deployment

from sd_endpoint.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deployment"
ONLINE = ("online/deployment.yml", "online/safe-deployment.yml")
MODEL_DIR = REPO / "models" / "stable-diffusion-2-1"
AZURE_MAX_REQUEST_TIMEOUT_MS = 180_000


def online(name: str) -> ManagedOnlineDeployment:
    dep = load_online_deployment(DEPLOY / name)
    assert isinstance(dep, ManagedOnlineDeployment)
    return dep


def server_settings(env: dict[str, str]) -> Settings:
    """The Settings the container would build from the deployment's environment_variables."""
    ours = {k: v for k, v in env.items() if k.startswith("SD_ENDPOINT_")}
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("SD_ENDPOINT_")}
    try:
        os.environ.update(ours)
        return Settings()
    finally:
        for k in ours:
            os.environ.pop(k, None)
        os.environ.update(saved)


def test_endpoints() -> None:
    for name in ("online/endpoint.yml", "online/safe-endpoint.yml"):
        ep = load_online_endpoint(DEPLOY / name)
        assert isinstance(ep, ManagedOnlineEndpoint)
        assert ep.auth_mode == "key"
    safe = load_online_endpoint(DEPLOY / "online/safe-endpoint.yml")
    assert safe.identity is not None and safe.identity.type == "system_assigned"
    assert safe.properties == {"enforce_access_to_default_secret_stores": "enabled"}  # secret injection
    batch = load_batch_endpoint(DEPLOY / "batch/endpoint.yml")
    assert batch.auth_mode == "aad_token"
    assert {online(n).endpoint_name for n in ONLINE} == {"sd21-endpoint", "sd21-safe-endpoint"}


@pytest.mark.parametrize("name", ONLINE)
def test_online_deployment_paths(name: str) -> None:
    dep = online(name)
    base = (DEPLOY / name).parent
    assert Path(dep.model.path) == MODEL_DIR  # the folder the README tells users to download into
    assert dep.code_configuration is not None
    code = (base / dep.code_configuration.code).resolve()
    assert code == REPO
    assert (code / dep.code_configuration.scoring_script).is_file()
    assert dep.code_configuration.scoring_script == "score.py"
    build = dep.environment.build
    assert (base / build.path).resolve() == REPO and (REPO / build.dockerfile_path).is_file()
    assert build.dockerfile_path == "environment/Dockerfile"
    assert dep.instance_type == "Standard_NC24ads_A100_v4"


@pytest.mark.parametrize("name", ONLINE)
def test_online_request_settings_agree_with_the_server(name: str) -> None:
    dep = online(name)
    env = {k: str(v) for k, v in dep.environment_variables.items()}
    settings = server_settings(env)
    rs = dep.request_settings
    # Our own timeout fires first (408 with a message, generation stopped) and Azure's limit is respected.
    assert settings.request_timeout_ms < rs.request_timeout_ms <= AZURE_MAX_REQUEST_TIMEOUT_MS
    assert rs.request_timeout_ms - settings.request_timeout_ms >= 2_000  # room to encode and send
    # One request per azmlinfsrv worker; the server's own limit says the same.
    assert rs.max_concurrent_requests_per_instance == int(env["WORKER_COUNT"]) == settings.max_concurrent_requests
    assert rs.max_queue_wait_ms == settings.max_queue_wait_ms
    # Every variable we set is one Settings reads (no typo silently ignored).
    for key in env:
        if key.startswith("SD_ENDPOINT_"):
            assert key.removeprefix("SD_ENDPOINT_").lower() in Settings.model_fields, key


@pytest.mark.parametrize("name", ONLINE)
def test_probes_allow_for_loading_the_model(name: str) -> None:
    dep = online(name)
    routes = dep.environment.inference_config
    # Under azmlinfsrv, GET / answers only after init() (model load + warm-up): the readiness route.
    assert routes["readinessRoute"] == {"port": 5001, "path": "/"}
    assert routes["livenessRoute"] == {"port": 5001, "path": "/"}
    assert routes["scoringRoute"] == {"port": 5001, "path": "/score"}
    live, ready = dep.liveness_probe, dep.readiness_probe
    # Liveness must not restart a container that is still loading 5 GB of weights (and compiling kernels).
    assert live.initial_delay >= 300
    assert live.initial_delay + live.period * live.failure_threshold >= 15 * 60
    assert ready.initial_delay + ready.period * ready.failure_threshold >= 15 * 60
    assert ready.period <= 10  # and traffic starts soon after it is ready
    # gunicorn must not kill a worker that is still in init().
    assert int(dep.environment_variables["WORKER_TIMEOUT"]) >= live.initial_delay


def test_safe_deployment_is_the_plain_one_plus_screening() -> None:
    plain, safe = online("online/deployment.yml"), online("online/safe-deployment.yml")
    added = {k: v for k, v in safe.environment_variables.items() if k not in plain.environment_variables}
    assert set(added) == {
        "CONTENT_SAFETY_ENDPOINT",
        "CONTENT_SAFETY_KEY",
        "CONTENT_SAFETY_THRESHOLD",
        "CONTENT_SAFETY_FAIL_OPEN",
    }
    # The key comes from a workspace connection (secret injection), never a literal.
    assert added["CONTENT_SAFETY_KEY"] == "${{azureml://connections/content-safety/credentials/key}}"
    assert added["CONTENT_SAFETY_ENDPOINT"] == "${{azureml://connections/content-safety/target}}"
    assert added["CONTENT_SAFETY_FAIL_OPEN"] == "false"
    for key in ("request_timeout_ms", "max_concurrent_requests_per_instance", "max_queue_wait_ms"):
        assert getattr(safe.request_settings, key) == getattr(plain.request_settings, key)
    assert {k: v for k, v in safe.environment_variables.items() if k in plain.environment_variables} == dict(
        plain.environment_variables
    )
    from sd_endpoint.settings import ContentSafetySettings

    for key in added:
        assert key.removeprefix("CONTENT_SAFETY_").lower() in ContentSafetySettings.model_fields, key


def test_batch_deployment() -> None:
    path = DEPLOY / "batch/deployment.yml"
    dep = load_model_batch_deployment(path)
    assert isinstance(dep, ModelBatchDeployment)
    s = dep.settings
    assert (s.output_action, s.output_file_name) == ("append_row", "predictions.csv")
    assert s.mini_batch_size >= 1 and s.max_concurrency_per_instance >= 1
    assert s.retry_settings.max_retries >= 1 and s.retry_settings.timeout >= 600
    assert s.error_threshold >= 0
    assert (path.parent / dep.code_configuration.code).resolve() == REPO
    assert dep.code_configuration.scoring_script == "batch_score.py" and (REPO / "batch_score.py").is_file()
    assert Path(dep.model.path) == MODEL_DIR
    assert (path.parent / dep.environment.build.path).resolve() == REPO
    assert dep.environment.build.dockerfile_path == "environment/Dockerfile.batch"
    dockerfile = (REPO / dep.environment.build.dockerfile_path).read_text()
    env = s.environment_variables
    # The worker interpreter the deployment names is the model environment the batch image creates.
    assert env["SD_ENDPOINT_BATCH_PYTHON"] == "/opt/conda-envs/sd-endpoint/bin/python"
    assert "SD_ENDPOINT_ENV=/opt/conda-envs/sd-endpoint " in dockerfile.replace("\\", " ")
    # The parameters are valid for the contract (the runner would refuse bad ones at start-up).
    from sd_endpoint.contract import Limits
    from sd_endpoint.request_parsing import parse_request

    params = json.loads(env["SD_ENDPOINT_BATCH_PARAMETERS"])
    parse_request({"input_data": {"data": ["x"]}, "parameters": params}, Limits())
    # The cluster the deployment names is the one compute.yml creates, with room for instance_count nodes.
    compute = load_compute(DEPLOY / "batch/compute.yml")
    assert dep.compute == compute.name
    assert compute.max_instances >= dep.resources["instance_count"] and compute.min_instances == 0


def test_legacy_batch_loader_rejects_the_settings_form() -> None:
    """Why the test above uses ModelBatchDeployment: `load_batch_deployment` still reads the flat form."""
    from azure.ai.ml import load_batch_deployment
    from marshmallow.exceptions import ValidationError

    with pytest.raises((ValidationError, Exception), match="settings"):
        load_batch_deployment(DEPLOY / "batch/deployment.yml")


def test_sample_requests_are_valid_requests() -> None:
    from sd_endpoint.contract import Limits
    from sd_endpoint.request_parsing import parse_request

    samples = sorted(DEPLOY.glob("sample-request*.json"))
    assert [p.name for p in samples] == [
        "sample-request-image-to-image.json",
        "sample-request-inpainting.json",
        "sample-request-negative-prompt.json",
        "sample-request-parameters.json",
        "sample-request.json",
    ]
    parsed = {p.name: parse_request(p.read_bytes(), Limits()) for p in samples}
    image_to_image, inpainting = parsed["sample-request-image-to-image.json"], parsed["sample-request-inpainting.json"]
    assert (image_to_image.spec.task, image_to_image.spec.strength) == ("image-to-image", 0.75)
    assert (inpainting.spec.task, inpainting.spec.width, inpainting.spec.height) == ("inpainting", 768, 768)
    assert inpainting.rows[0].mask is not None and inpainting.rows[0].mask.size == (768, 768)
    assert parsed["sample-request.json"].rows[0].prompt == "a photograph of an astronaut riding a horse"
    assert [r.negative_prompt for r in parsed["sample-request-negative-prompt.json"].rows] == [
        "blurry; cartoonish",
        "text, watermark",
    ]
    with_params = parsed["sample-request-parameters.json"]
    assert (with_params.spec.steps, with_params.spec.scheduler, with_params.image_count) == (
        30,
        "dpm_solver_multistep",
        2,
    )


def test_sample_batch_inputs_read_cleanly() -> None:
    from sd_endpoint.batch import read_input

    files = sorted((DEPLOY / "batch/sample-inputs").iterdir())
    assert {p.suffix for p in files} == {".csv", ".jsonl", ".txt"}
    for path in files:
        rows, bad = read_input(path)
        assert rows and bad == [], path


def test_code_upload_is_limited_to_what_the_scripts_and_images_need() -> None:
    """Azure uploads code_configuration and build contexts through the root's .amlignore (azure-ai-ml's own rules)."""
    ignore = get_ignore_file(REPO)
    assert Path(ignore.path) == REPO / ".amlignore"
    dockerfiles = [REPO / "environment/Dockerfile", REPO / "environment/Dockerfile.batch"]
    needed = ["score.py", "batch_score.py", "pyproject.toml", "README.md", "constraints.txt"]
    needed += [str(p.relative_to(REPO)) for p in (REPO / "src").rglob("*") if p.is_file() and "egg-info" not in str(p)]
    needed += [str(p.relative_to(REPO)) for p in (REPO / "environment").iterdir()]
    for rel in needed:
        if "__pycache__" in rel:
            continue
        assert not ignore.is_file_excluded(REPO / rel), rel
    for rel in [
        ".venv/bin/python",
        "models/stable-diffusion-2-1/unet/diffusion_pytorch_model.safetensors",
        "tests/conftest.py",
        "notebooks/text-to-image-online-endpoint.ipynb",
        ".git/HEAD",
        "src/sd_endpoint/__pycache__/batch.cpython-311.pyc",
    ]:
        assert ignore.is_file_excluded(REPO / rel), rel
    # Everything the Dockerfiles COPY is in the upload.
    for dockerfile in dockerfiles:
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY "):
                for src in line.split()[1:-1]:
                    files = [p for p in (REPO / src).rglob("*") if p.is_file()] if src.endswith("/") else [REPO / src]
                    assert files and all(p.exists() for p in files), (dockerfile.name, src)
                    kept = [p for p in files if "__pycache__" not in p.parts and "egg-info" not in str(p)]
                    assert kept and not any(ignore.is_file_excluded(p) for p in kept), (dockerfile.name, src)


# ------------------------------------------------------------------------------------------------
# The image's command


def _fake_bin(folder: Path) -> dict[str, str]:
    folder.mkdir()
    for name in ("azmlinfsrv", "sd-endpoint"):
        tool = folder / name
        tool.write_text(f'#!/bin/sh\necho "{name} $* (cwd $(pwd))"\n')
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    return {"PATH": f"{folder}:/usr/bin:/bin"}


def _entrypoint(env: dict[str, Any], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(REPO / "environment/entrypoint.sh")], env=env, cwd=cwd, capture_output=True, text=True, check=False
    )


def test_entrypoint_runs_the_scoring_script_azure_mounted(tmp_path: Path) -> None:
    env = _fake_bin(tmp_path / "bin")
    app = tmp_path / "azureml-app" / "main"
    app.mkdir(parents=True)
    # What Azure sets for code_configuration (AML_APP_ROOT = the code folder, the script relative to it).
    got = _entrypoint({**env, "AZUREML_ENTRY_SCRIPT": "score.py", "AML_APP_ROOT": str(app)}, tmp_path)
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() == f"azmlinfsrv --entry_script {app}/score.py --port 5001 (cwd {app})"


def test_entrypoint_defaults_to_our_server_and_validates_the_choice(tmp_path: Path) -> None:
    env = _fake_bin(tmp_path / "bin")
    got = _entrypoint({**env, "SD_ENDPOINT_PORT": "8080"}, tmp_path)
    assert got.stdout.strip() == f"sd-endpoint serve --host 0.0.0.0 --port 8080 (cwd {tmp_path})"
    home = tmp_path / "opt"
    home.mkdir()
    got = _entrypoint({**env, "SD_ENDPOINT_SERVER": "azmlinfsrv", "SD_ENDPOINT_HOME": str(home)}, tmp_path)
    assert got.stdout.strip() == f"azmlinfsrv --entry_script {home}/score.py --port 5001 (cwd {home})"
    got = _entrypoint({**env, "SD_ENDPOINT_SERVER": "flask"}, tmp_path)
    assert got.returncode == 2 and "expected 'azmlinfsrv' or 'serve'" in got.stderr


def test_autoscale_script_targets_the_deployment() -> None:
    script = DEPLOY / "online/autoscale.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True, check=False).returncode == 0
    text = script.read_text()
    dep = online("online/deployment.yml")
    assert f"ENDPOINT=${{1:-{dep.endpoint_name}}}" in text and f"DEPLOYMENT=${{2:-{dep.name}}}" in text
    # Latency is in milliseconds and must sit below the request timeout, or the rule could never fire.
    thresholds = [int(m) for m in re.findall(r"RequestLatency [<>] (\d+)", text)]
    assert thresholds and max(thresholds) < dep.request_settings.request_timeout_ms
