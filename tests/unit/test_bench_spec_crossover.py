"""The speculation crossover bench's table: ratios against ``off`` per workload and batch."""

from __future__ import annotations

from bench.spec_crossover import Cell, markdown


def test_markdown_gives_each_method_its_ratio_to_off_and_acceptance() -> None:
    cells = [Cell("copy", "off", 4, tok_s=80.0),
             Cell("copy", "ngram", 4, tok_s=120.0, proposed=10, accepted=7, same_tokens=True),
             Cell("chat", "off", 4, tok_s=50.0),
             Cell("chat", "ngram", 4, tok_s=25.0, same_tokens=False)]
    lines = markdown(cells).splitlines()
    assert "| copy | 4 | ngram | 120.0 | 1.50x | 70% | yes |" in lines
    assert "| chat | 4 | ngram | 25.0 | 0.50x | - | NO |" in lines
    assert cells[0].acceptance is None and cells[1].acceptance == 0.7
