"""The notebooks' local path, run headless under nbclient with the tiny model; their outputs are checked.

Each run injects, papermill-style, a cell after the "parameters" cell (the tiny model, 64x64 images, 3
steps), then a last cell that lists the kernel's live child processes: the notebook must have stopped
every server it started.
"""

from __future__ import annotations

import base64
import io
import os
import re
from pathlib import Path

import nbformat
import psutil
import pytest
from nbclient import NotebookClient
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
SMALL = {"num_inference_steps": 3, "height": 64, "width": 64}
CHILDREN_CHECK = """
import psutil
live = [p for p in psutil.Process().children(recursive=True) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
print("LIVE CHILDREN", sorted(p.pid for p in live))
"""

pytestmark = pytest.mark.slow


@pytest.fixture
def notebook_env(monkeypatch: pytest.MonkeyPatch, cache_dir: Path) -> None:
    for name, value in {
        "SD_ENDPOINT_CACHE_DIR": str(cache_dir),
        "SD_ENDPOINT_DEVICE": "cpu",
        "SD_ENDPOINT_DTYPE": "float32",
        "SD_ENDPOINT_WARMUP": "false",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }.items():
        monkeypatch.setenv(name, value)
    for name in list(os.environ):
        if name.startswith(("CONTENT_SAFETY_", "AZUREML_")) or name in ("SD_ENDPOINT_MODEL", "SD_ENDPOINT_KEYS"):
            monkeypatch.delenv(name)


def run(name: str, model: Path) -> tuple[str, list[Image.Image]]:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    params = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    assert 'MODE = "local"' in nb.cells[params].source  # the default path is the one that runs anywhere
    nb.cells.insert(params + 1, nbformat.v4.new_code_cell(f"MODEL = {str(model)!r}\nPARAMETERS = {SMALL!r}"))
    nb.cells.append(nbformat.v4.new_code_cell(CHILDREN_CHECK))
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}})
    try:
        client.execute()
    finally:
        leftovers = _leftover_pids(nb)
        for pid in leftovers:  # only the processes this notebook started, by pid
            psutil.Process(pid).kill()
    assert leftovers == [], f"{name} left processes running: {leftovers}"
    text: list[str] = []
    images: list[Image.Image] = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                text.append(out["text"])
            data = out.get("data", {})
            if "text/plain" in data:
                text.append(data["text/plain"])
            if "image/png" in data:
                img = Image.open(io.BytesIO(base64.b64decode(data["image/png"])))
                img.load()
                images.append(img)
    return "\n".join(text), images


def _leftover_pids(nb: nbformat.NotebookNode) -> list[int]:
    for out in nb.cells[-1].get("outputs", []):
        match = re.search(r"LIVE CHILDREN \[(.*)\]", out.get("text", ""))
        if match:
            return [int(p) for p in match.group(1).split(",") if p.strip()]
    return []


def test_online_notebook_local_path(notebook_env: None, tiny_model_dir: Path) -> None:
    text, images = run("text-to-image-online-endpoint.ipynb", tiny_model_dir)
    # Model card form (1 image), negative-prompt rows (2), parameters with num_images_per_prompt 2 (2),
    # image-to-image (1) and inpainting (1); plus the 128x128 input image and mask shown before them.
    assert [im.size for im in images if im.size != (64, 64)] == [(128, 128), (128, 128)]
    assert len(images) == 9
    assert text.count("HTTP 200") == 5
    assert "row 0: 'a photograph of an astronaut riding a horse' seed=42 size=(64, 64)" in text
    assert "seeds: [42, 43]" in text
    assert "row 0: 'an oil painting of hills by a lake at sunset' seed=42 size=(64, 64)" in text
    assert "row 0: 'a small red sailing boat on the lake' seed=7 size=(64, 64)" in text
    assert re.search(r"400 \{'message': .*guidence_scale", text)
    assert "local server stopped; images shown: 7" in text


def test_safe_notebook_local_path_with_the_emulator(notebook_env: None, tiny_model_dir: Path) -> None:
    text, images = run("safe-text-to-image-online-endpoint.ipynb", tiny_model_dir)
    assert len(images) == 1 and images[0].size == (64, 64)
    assert "nsfw_content_detected=False" in text
    assert "row 1: no image, nsfw_content_detected=True" in text
    assert '"stage": "prompt"' in text and "Violence" in text
    assert "emulator and server stopped; images shown: 1" in text


def test_batch_notebook_local_path(notebook_env: None, tiny_model_dir: Path) -> None:
    text, images = run("text-to-image-batch-endpoint.ipynb", tiny_model_dir)
    assert len(images) == 7 and all(im.size == (64, 64) for im in images)  # 3 csv + 2 jsonl + 2 txt rows
    assert "3 file(s), 7 row(s): 7 generated, 0 already present, 0 blocked, 0 error(s)" in text
    assert "3 file(s), 7 row(s): 0 generated, 7 already present" in text  # the rerun resumes
    assert "rows by status: {'ok': 7} ; images shown: 7" in text
    assert "prompts.csv:2 ok      seed=1 'a photograph of an astronaut riding a horse on mars'" in text
