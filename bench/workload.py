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
WORKLOADS = ("mixed", "uniform")


@dataclass(frozen=True, slots=True)
class BenchRequest:
    index: int
    prompt: str
    max_tokens: int

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt}]


def make_requests(workload: str, count: int, max_tokens_cap: int | None = None,
                  ) -> list[BenchRequest]:
    """``count`` requests; ``mixed`` cycles max_tokens 16, 256, 32, 128, 64, 16, 32, 64."""
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; choose from {', '.join(WORKLOADS)}")
    out = []
    for i in range(count):
        budget = MIXED_MAX_TOKENS[i % len(MIXED_MAX_TOKENS)] if workload == "mixed" \
            else UNIFORM_MAX_TOKENS
        if max_tokens_cap:
            budget = min(budget, max_tokens_cap)
        out.append(BenchRequest(i, PROMPTS[i % len(PROMPTS)], budget))
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
