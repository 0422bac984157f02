"""A tiny model description for gateway tests: one token per byte, a ChatML template."""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from shared.model_info import ModelInfo

CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'assistant' %}"
    "{{ raise_exception('the conversation must not start with an assistant message') }}"
    "{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def tiny_tokenizer_json() -> bytes:
    """A byte-level BPE with no merges: one token per byte, plus three special tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {char: i for i, char in enumerate(alphabet)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS])
    return tokenizer.to_str().encode()


def tiny_model_info(name: str = "tiny", max_context: int = 256,
                    chat_template: str = CHAT_TEMPLATE, **extra: object) -> ModelInfo:
    """``extra``: other ``ModelInfo`` fields (``max_batch_tokens``, ``generation_defaults``)."""
    return ModelInfo(name=name, max_context=max_context, vocab_size=256 + len(SPECIAL_TOKENS),
                     tokenizer_json=tiny_tokenizer_json(), chat_template=chat_template,
                     bos_token="<|endoftext|>", eos_token="<|im_end|>",
                     eos_token_ids=[258], add_bos_token=False, **extra)  # type: ignore[arg-type]
