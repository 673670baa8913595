"""The pipeline's modules without their weights, and the adoption of weights loaded elsewhere.

The fast loader (``fast_load.py``) builds each component from its config with the parameters on the
``meta`` device (no random initialisation, no memory) while its readers fill the real tensors, then hands
those tensors to the module with ``load_state_dict(assign=True)``: nothing is copied again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Keys that older transformers versions saved but current modules recompute (non-persistent buffers).
_IGNORABLE_SUFFIXES = ("position_ids",)


def empty_module(component: str, folder: Path) -> Any:
    """The component's module with parameters on the meta device (buffers real), from its config."""
    from accelerate import init_empty_weights

    comp_dir = folder / component
    with init_empty_weights(include_buffers=False):
        if component == "text_encoder":
            import transformers

            config = transformers.AutoConfig.from_pretrained(str(comp_dir), local_files_only=True)
            cls = getattr(transformers, (config.architectures or ["CLIPTextModel"])[0])
            with _no_init_weights():  # every weight is loaded next; skip transformers' initialisation pass
                module = cls(config)
        else:
            import diffusers

            config_dict = json.loads((comp_dir / "config.json").read_text())
            cls = getattr(diffusers, config_dict["_class_name"])
            module = cls.from_config(config_dict)
            module.register_to_config(_name_or_path=str(comp_dir))  # as from_pretrained records it
    return module


def _no_init_weights() -> Any:
    try:
        from transformers.initialization import no_init_weights

        return no_init_weights()
    except ImportError:  # older transformers: initialise (on meta, so only time is lost)
        import contextlib

        return contextlib.nullcontext()


def match_keys(component: str, expected: set[str], loaded: dict[str, Any]) -> dict[str, Any] | None:
    """Map the file's tensor names onto the module's: as is, or with transformers 4's ``text_model.``
    prefix; None when neither matches."""
    candidates = [loaded]
    if component == "text_encoder":
        p = "text_model."
        candidates.append({k.removeprefix(p): v for k, v in loaded.items()})
        candidates.append({(k if k.startswith(p) else p + k): v for k, v in loaded.items()})
    for cand in candidates:
        kept = {k: v for k, v in cand.items() if k in expected or not k.endswith(_IGNORABLE_SUFFIXES)}
        if set(kept) == expected:
            return kept
    return None


def adopt(module: Any, state: dict[str, Any], device: Any) -> Any:
    """Give ``module`` the loaded tensors (no copy) and everything it needs on ``device``, in eval mode."""
    module.load_state_dict(state, strict=True, assign=True)
    for name, buf in list(module.named_buffers()):
        if buf.device != device:  # non-persistent buffers (e.g. CLIP's position_ids) were built on the CPU
            owner = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
            owner._buffers[name.rpartition(".")[2]] = buf.to(device)
    module.eval()
    module.requires_grad_(False)
    return module


def tokenizer_and_scheduler(folder: Path, index: dict[str, Any]) -> tuple[Any, Any]:
    """The folder's tokenizer and scheduler, of the classes its model_index.json names."""
    import diffusers
    import transformers

    tok_cls = getattr(transformers, str(index.get("tokenizer", [None, "CLIPTokenizer"])[1]))
    tokenizer = tok_cls.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
    sched_cls = getattr(diffusers, str(index.get("scheduler", [None, "DDIMScheduler"])[1]))
    scheduler = sched_cls.from_pretrained(str(folder / "scheduler"), local_files_only=True)
    return tokenizer, scheduler
