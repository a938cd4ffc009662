"""Stock pipelines of the coverage families with a T5 (or BERT + mT5) text encoder, from tiny components (see stock_pipelines.py)."""

from __future__ import annotations

from stock_pipelines import StockCase

CASES: list[StockCase] = []
