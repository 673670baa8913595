"""The real 49,408-token CLIP BPE tokenizer, built offline from the vocabulary open-clip-torch ships.

SD 2.x uses OpenCLIP's tokenizer with ``!`` as the pad token (id 0); diffusers reproduces that quirk and
so do we. ``import open_clip`` needs torchvision, so the package folder is located without importing it.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from sd_endpoint.errors import ModelLoadError

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49_408
# CLIP's SimpleTokenizer keeps the first 49152 - 256 - 2 merges of the file (after its header line).
_MERGE_COUNT = 49_152 - 256 - 2
TOKENIZER_CONFIG = {
    "tokenizer_class": "CLIPTokenizer",
    "model_max_length": 77,
    "do_lower_case": True,
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "!",
}


def bpe_vocab_path() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The CLIP tokenizer vocabulary comes from the open-clip-torch package, which is not installed: "
            "run `pip install --no-deps open-clip-torch` (the README's setup does this)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BPE_FILE
    if not path.is_file():
        raise ModelLoadError(f"open-clip-torch is installed but {path} is missing.")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def write_tokenizer_files(out_dir: Path) -> Path:
    """Write vocab.json, merges.txt and the configs that CLIPTokenizer.from_pretrained reads."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(bpe_vocab_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : _MERGE_COUNT + 1]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    if len(vocab) != VOCAB_SIZE:
        raise ModelLoadError(f"Built a {len(vocab)}-token vocabulary from {bpe_vocab_path()}; expected {VOCAB_SIZE}.")
    (out_dir / "vocab.json").write_text(
        json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8"
    )
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2), encoding="utf-8")
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({k: TOKENIZER_CONFIG[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}),
        encoding="utf-8",
    )
    return out_dir


def cached_tokenizer_dir(cache_dir: Path) -> Path:
    """Build the tokenizer files once per cache folder (atomically, so parallel workers can race)."""
    target = cache_dir / "clip-tokenizer"
    if (target / "merges.txt").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tok-", dir=cache_dir))
    try:
        write_tokenizer_files(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
