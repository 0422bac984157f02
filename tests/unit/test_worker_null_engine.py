"""The null engine: the Engine contract without a model, and its published tokenizer."""

from __future__ import annotations

from tokenizers import Tokenizer

from shared.model_info import ModelInfo
from shared.protocol import SamplingParams
from worker.engine.types import EngineRequest
from worker.null_engine import IM_END_ID, NullEngine, null_model_info, word_token


def request(request_id: str, max_tokens: int = 16) -> EngineRequest:
    return EngineRequest(request_id, [1, 2, 3], SamplingParams(max_tokens=max_tokens))


def run_to_end(engine: NullEngine) -> list[list[str]]:
    steps = []
    while engine.has_unfinished():
        steps.append([f"{o.id}:{o.finish_reason}" for o in engine.step() if o.finished])
    return steps


def test_emits_min_of_max_tokens_and_configured_tokens_one_per_step() -> None:
    engine = NullEngine(max_batch_size=4, num_tokens=3)
    engine.add_request(request("a", max_tokens=2))
    engine.add_request(request("b", max_tokens=50))

    first = engine.step()
    assert [(o.id, o.new_token_ids, o.text_delta, o.first_token) for o in first] == [
        ("a", [word_token(0)[0]], " lorem", True), ("b", [word_token(0)[0]], " lorem", True)]
    assert run_to_end(engine) == [["a:length"], ["b:length"]]


def test_free_slots_follow_the_running_count() -> None:
    engine = NullEngine(max_batch_size=2, num_tokens=1)
    assert engine.num_free_slots() == 2
    engine.add_request(request("a"))
    assert engine.num_free_slots() == 1
    engine.step()
    assert engine.num_free_slots() == 2
    assert engine.stats().steps == 1


def test_abort_finishes_with_cancelled() -> None:
    engine = NullEngine(max_batch_size=2, num_tokens=100)
    engine.add_request(request("a"))
    engine.step()
    engine.abort_request("a")
    engine.abort_request("unknown")  # ignored
    [out] = engine.step()
    assert (out.finished, out.finish_reason, out.num_output_tokens) == (True, "cancelled", 1)
    assert not engine.has_unfinished()


def test_records_what_was_added_between_steps() -> None:
    engine = NullEngine(max_batch_size=4, num_tokens=2)
    engine.add_request(request("a"))
    engine.add_request(request("b"))
    engine.step()
    engine.add_request(request("c"))
    engine.step()
    assert list(engine.admissions) == [["a", "b"], ["c"]]


def test_duplicate_ids_are_refused() -> None:
    engine = NullEngine(max_batch_size=4, num_tokens=2)
    engine.add_request(request("a"))
    try:
        engine.add_request(request("a"))
    except ValueError:
        return
    raise AssertionError("duplicate id accepted")


def test_model_info_round_trips_and_its_tokenizer_works() -> None:
    info = ModelInfo.from_mapping(
        {k.encode(): v for k, v in null_model_info("null").to_mapping().items()})
    tokenizer = Tokenizer.from_str(info.tokenizer_json.decode())

    text = "<|im_start|>user\nHéllo 🙂<|im_end|>"
    ids = tokenizer.encode(text).ids
    assert ids[-1] == IM_END_ID == info.eos_token_ids[0]
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.decode([word_token(i)[0] for i in range(3)]) == " lorem ipsum dolor"
    assert info.max_context == 2048
    assert max(ids) < info.vocab_size
    assert "<|im_start|>" in info.chat_template
