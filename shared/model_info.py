"""What a worker publishes about its model so gateways can validate and tokenize without it.

Stored as the hash ``Keys.model_info(name)``. The gateway rebuilds a tokenizer from
``tokenizer_json`` (the ``tokenizers`` library, no torch) and renders ``chat_template``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import msgpack

from shared.errors import ProtocolError


@dataclass(slots=True)
class ModelInfo:
    name: str
    max_context: int  # prompt + generated tokens must fit
    vocab_size: int
    tokenizer_json: bytes  # the model's tokenizer.json
    chat_template: str = ""  # jinja2; "" -> the model has none (chat endpoint answers 400)
    bos_token: str = ""
    eos_token: str = ""
    eos_token_ids: list[int] = field(default_factory=list)
    add_bos_token: bool = False  # prepend bos to plain completion prompts
    quantization: str = "none"
    dtype: str = ""
    # The serving worker's KV budget (``TOKENFLEET_MAX_BATCH_TOKENS``): a request whose prompt
    # + max_tokens exceeds it can never run; 0 = unknown (an older worker).
    max_batch_tokens: int = 0
    # Sampling defaults for requests that leave a field unset (vLLM reads them from the
    # model's ``generation_config.json``): keys among temperature, top_p, top_k, min_p,
    # repetition_penalty. A request's own values always win.
    generation_defaults: dict[str, float] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.tokenizer_json)
        digest.update(self.chat_template.encode())
        # budgets and defaults too: a gateway refreshes its cached info when they change
        digest.update(f"{self.max_batch_tokens}:{sorted(self.generation_defaults.items())}"
                      .encode())
        return digest.hexdigest()[:16]

    def to_mapping(self) -> dict[str, bytes]:
        payload = {
            "name": self.name,
            "max_context": self.max_context,
            "vocab_size": self.vocab_size,
            "chat_template": self.chat_template,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "eos_token_ids": self.eos_token_ids,
            "add_bos_token": self.add_bos_token,
            "quantization": self.quantization,
            "dtype": self.dtype,
            "max_batch_tokens": self.max_batch_tokens,
            "generation_defaults": self.generation_defaults,
        }
        return {
            "meta": msgpack.packb(payload, use_bin_type=True),
            "tokenizer_json": self.tokenizer_json,
            "fingerprint": self.fingerprint.encode(),
        }

    @classmethod
    def from_mapping(cls, mapping: dict[bytes, bytes]) -> ModelInfo:
        try:
            meta = msgpack.unpackb(mapping[b"meta"], raw=False)
            return cls(
                name=meta["name"],
                max_context=int(meta["max_context"]),
                vocab_size=int(meta["vocab_size"]),
                tokenizer_json=mapping[b"tokenizer_json"],
                chat_template=meta.get("chat_template", ""),
                bos_token=meta.get("bos_token", ""),
                eos_token=meta.get("eos_token", ""),
                eos_token_ids=list(meta.get("eos_token_ids", [])),
                add_bos_token=bool(meta.get("add_bos_token", False)),
                quantization=meta.get("quantization", "none"),
                dtype=meta.get("dtype", ""),
                max_batch_tokens=int(meta.get("max_batch_tokens", 0)),
                generation_defaults={str(k): float(v) for k, v in
                                     dict(meta.get("generation_defaults") or {}).items()},
            )
        except (KeyError, TypeError, ValueError, msgpack.ExtraData) as exc:
            raise ProtocolError(f"malformed model info: {exc}") from exc
