"""The benchmark workloads: fixed chat prompts with exact token budgets."""

from __future__ import annotations

from dataclasses import dataclass

PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about autumn leaves.",
    "Explain how a bicycle works to a child.",
    "List five fruits that are rich in vitamin C.",
    "What are the benefits of regular exercise?",
    "Describe the water cycle in simple terms.",
    "Give me three tips for learning a new language.",
    "Why is the sky blue?",
    "Summarize the plot of Romeo and Juliet.",
    "How do I make a cup of green tea?",
    "What is the difference between weather and climate?",
    "Tell me a fun fact about octopuses.",
    "Write a haiku about the ocean.",
    "What should I pack for a weekend camping trip?",
    "Explain what a computer program is.",
    "Suggest a name for a friendly robot.",
)

MIXED_MAX_TOKENS = (16, 256, 32, 128, 64, 16, 32, 64)
UNIFORM_MAX_TOKENS = 64
SHARED_PREFIX_MAX_TOKENS = 32
# About 200 tokens (SmolLM2's tokenizer, chat template included) that every shared-prefix
# request starts with; each adds its own ~20-token question (PROMPTS).
SYSTEM_PROMPT = (
    "You are the help desk assistant of Northwind Outfitters, a shop for hiking, camping and "
    "climbing gear with stores in Denver, Portland and Boise and an online catalogue. Answer "
    "in plain, friendly English and keep every answer short: two or three sentences unless "
    "the customer asks for more. Never invent prices, stock levels, delivery dates or store "
    "hours; when you do not know, say so and suggest calling the store or writing to the "
    "support address. Do not give medical or legal advice. If a question is about safety in "
    "the mountains, remind the customer to check the weather, tell someone their route and "
    "carry the ten essentials. Recommend products only by category, never by brand. Be kind "
    "to beginners, and when a customer sounds unsure, offer one simple next step they can "
    "take today. Returns are accepted within sixty days with a receipt."
)
# copy: the answer repeats the prompt (what prompt-lookup speculative decoding is for)
COPY_INSTRUCTION = "Repeat the following text exactly, with no other words:\n\n"
COPY_TEXTS = (
    "The old lighthouse stood at the edge of the cliff for more than a hundred years. Every "
    "night its keeper climbed the narrow stairs, trimmed the wick and cleaned the great lens, "
    "so that the ships passing in the dark would know where the rocks were hidden.",
    "To bake a simple loaf of bread, mix flour, water, salt and yeast in a large bowl. Knead "
    "the dough for ten minutes, let it rise in a warm place for an hour, shape it, let it rise "
    "again, and bake it in a hot oven until the crust is golden brown.",
    "The committee met on Tuesday to discuss the budget for the coming year. After a long "
    "debate, the members agreed to spend more on the library and the park, and less on new "
    "office furniture, and they asked the treasurer to prepare a revised plan by Friday.",
    "A river begins as rain falling on hills and mountains. The water gathers in small streams, "
    "the streams join into larger ones, and the river grows as it flows down towards the sea, "
    "carrying sand and stones that slowly shape the valley it passes through.",
)
# Every paragraph above is 50-63 tokens, so 48 tokens are all copying. (96 until 2026-12-01:
# under ``ignore_eos`` the last ~40% of each answer was what the model invents after its end
# of turn, which no prompt lookup can predict; a copy task measured that instead.)
COPY_MAX_TOKENS = 48
WORKLOADS = ("mixed", "uniform", "shared-prefix", "copy")


@dataclass(frozen=True, slots=True)
class BenchRequest:
    index: int
    prompt: str
    max_tokens: int
    system: str = ""  # a system message before the prompt (the shared-prefix workload)

    @property
    def messages(self) -> list[dict[str, str]]:
        user = [{"role": "user", "content": self.prompt}]
        return [{"role": "system", "content": self.system}, *user] if self.system else user

    @property
    def key(self) -> str:
        """What identifies the prompt's tokens (system message and prompt)."""
        return f"{self.system}\n{self.prompt}" if self.system else self.prompt


def make_requests(workload: str, count: int, max_tokens_cap: int | None = None,
                  ) -> list[BenchRequest]:
    """``count`` requests; ``mixed`` cycles max_tokens 16, 256, 32, 128, 64, 16, 32, 64;
    ``uniform`` asks 64 each; ``shared-prefix`` puts the same ~200-token system prompt
    before every question and asks 32 tokens (prefill-heavy: what prefix caching is for);
    ``copy`` asks to repeat a paragraph (``COPY_MAX_TOKENS`` each)."""
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; choose from {', '.join(WORKLOADS)}")
    out = []
    system = SYSTEM_PROMPT if workload == "shared-prefix" else ""
    for i in range(count):
        if workload == "mixed":
            budget = MIXED_MAX_TOKENS[i % len(MIXED_MAX_TOKENS)]
        elif workload == "shared-prefix":
            budget = SHARED_PREFIX_MAX_TOKENS
        elif workload == "copy":
            budget = COPY_MAX_TOKENS
        else:
            budget = UNIFORM_MAX_TOKENS
        if max_tokens_cap:
            budget = min(budget, max_tokens_cap)
        text = (COPY_INSTRUCTION + COPY_TEXTS[i % len(COPY_TEXTS)] if workload == "copy"
                else PROMPTS[i % len(PROMPTS)])
        out.append(BenchRequest(i, text, budget, system))
    return out


def split_among_clients(requests: list[BenchRequest], clients: int) -> list[list[BenchRequest]]:
    """Closed loop: deal ``requests`` out so that every client walks the max_tokens cycle from
    its own starting point: client ``c`` sends budgets ``cycle[c], cycle[c + 1], ...``.

    Striding (``c, c + N, ...``) would give one client every 256-token request when N is a
    multiple of the cycle; contiguous blocks would keep all clients in phase, so a static
    batch would be all-16 or all-256 tokens and never pay for padding. With a per-client
    phase, every client carries the same work (whole cycles) and batches stay mixed.
    """
    by_budget: dict[int, list[BenchRequest]] = {}
    for r in requests:
        by_budget.setdefault(r.max_tokens, []).append(r)
    order = [r.max_tokens for r in requests[:len(MIXED_MAX_TOKENS)]]
    base, extra = divmod(len(requests), clients)
    out: list[list[BenchRequest]] = []
    for c in range(clients):
        size = base + (1 if c < extra else 0)
        mine = []
        for k in range(size):
            wanted = order[(c + k) % len(order)]
            pool = by_budget.get(wanted) or next(p for p in by_budget.values() if p)
            mine.append(pool.pop())
        out.append(mine)
    return out
