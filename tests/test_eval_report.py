"""Report files: JSON machine keys (inf made JSON-safe), Markdown table, image grid and trade-off plot."""

from __future__ import annotations

import json

import torch
from PIL import Image

from cachekit.eval.report import jsonable, render_markdown, write_report


def _report(n_cached: int) -> dict:
    schedules = {"uncached": {"speedup": 1.0, "latency_s": 0.2, "macs_ratio": 1.0,
                              "latency": {"per_image_s": 0.2, "per_image_iqr_s": 0.01},
                              "metrics": {"fid": 30.0, "clip": 70.0}}}
    for i in range(n_cached):
        schedules[f"s{i}"] = {"speedup": 1.5 + i, "latency_s": 0.1, "macs_ratio": 0.6 - 0.1 * i,
                              "latency": {"per_image_s": 0.1, "per_image_iqr_s": 0.02},
                              "metrics": {"fid": 31.0 + i, "clip": 69.0 - i, "psnr": float("inf") if i == 0 else 30.0}}
    return {"model": "digits", "num_steps": 20, "world_size": 1, "device": "cpu",
            "prompts": {"name": "digits", "num_images": 4, "source": "test"},
            "seeds": {"base_seed": 0, "rule": "seed = base_seed + prompt_index"},
            "latency_protocol": {"warmup": 1, "repeats": 3}, "metrics_info": {"fid": {"backend": "x", "sha256": "y"}},
            "schedules": schedules}


def test_json_is_strict_and_keeps_machine_keys(tmp_path):
    paths = write_report(_report(1), tmp_path)
    text = paths["json"].read_text()
    data = json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))  # no Infinity/NaN tokens
    s0 = data["schedules"]["s0"]
    assert {"speedup", "latency_s", "macs_ratio", "metrics"} <= set(s0)
    assert s0["metrics"]["psnr"] == "inf"
    assert "tradeoff_plot" not in paths  # one cached schedule: no trade-off plot
    assert jsonable(torch.tensor([1.0, 2.0])) == [1.0, 2.0]


def test_markdown_table_has_a_row_per_schedule():
    md = render_markdown(_report(2))
    rows = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert len(rows) == 1 + 3  # header + uncached + 2 schedules
    assert "fid ↓" in rows[0] and "clip ↑" in rows[0]
    assert any(r.startswith("| s1 | 2.5 |") for r in rows)


def test_grid_and_tradeoff_plot_are_written(tmp_path):
    cols = {name: torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8) for name in ("uncached", "s0", "s1")}
    report = _report(2)
    paths = write_report(report, tmp_path, grid_columns=cols, grid_prompts=["a 1", "a 2", "a 3"])
    for key in ("grid", "tradeoff_plot", "json", "markdown"):
        assert paths[key].is_file()
    with Image.open(paths["grid"]) as im:
        assert im.size[0] > im.size[1] * 0.5  # three columns side by side
    md = paths["markdown"].read_text()
    assert "![grid](grid.png)" in md and "![tradeoff_plot](tradeoff.png)" in md
