"""Stock pipelines of the coverage families with a UMT5 or Gemma2 text encoder and Wan's video VAE, from tiny components (see stock_pipelines.py)."""

from __future__ import annotations

from stock_pipelines import StockCase

CASES: list[StockCase] = []
