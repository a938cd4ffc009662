"""Stock pipelines of the coverage families with a Qwen, GLM or other decoder-only language model as text encoder, from tiny components (see stock_pipelines.py)."""

from __future__ import annotations

from stock_pipelines import StockCase

CASES: list[StockCase] = []
