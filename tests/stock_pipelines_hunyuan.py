"""Stock pipelines of the coverage families with Llama / Qwen2.5-VL + CLIP or ByT5 text encoders (the Hunyuan families) and others, from tiny components (see stock_pipelines.py)."""

from __future__ import annotations

from stock_pipelines import StockCase

CASES: list[StockCase] = []
