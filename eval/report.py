"""Writing an evaluation for machines (report.json) and for people (report.md, image grid, quality-vs-speedup plot;
for video, frame strips, an animated preview and a per-frame plot).

The JSON is the contract other tools read: per schedule `speedup`, `latency_s`, `macs_ratio`, `metrics` (name ->
value), plus everything needed to trust the numbers (metric backends and weight hashes, reference set, seeds, counts).
Non-finite values (PSNR of identical images is inf) are written as strings, because JSON has no inf.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import torch

from cachekit.io import save_figure, write_text

__all__ = ["jsonable", "write_json", "render_markdown", "save_grid", "save_tradeoff_plot", "write_report",
           "render_video_markdown", "save_frame_strips", "preview_frames", "save_per_frame_plot", "write_video_report"]

_LOWER_IS_BETTER = {"fid", "kid", "kid_std", "lpips", "fvd"}


def jsonable(obj: Any) -> Any:
    """Recursively convert tensors/paths/non-finite floats into JSON-safe values."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if torch.is_tensor(obj):
        return jsonable(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, os.PathLike):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return jsonable(obj.item())
    return obj


def write_json(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Write the machine-readable report (sorted keys are not used: schedule order is meaningful)."""
    write_text(path, json.dumps(jsonable(report), indent=2) + "\n")


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{digits}g}"
    return str(v)


def render_markdown(report: dict[str, Any]) -> str:
    """A human summary: the comparison table first, then how each number was made."""
    scheds = report["schedules"]
    metric_names: list[str] = []
    for s in scheds.values():
        for k in s.get("metrics", {}):
            if k not in metric_names:
                metric_names.append(k)
    arrows = {m: (" ↓" if m in _LOWER_IS_BETTER else " ↑") for m in metric_names}
    lines = [
        f"# cachekit evaluation: {report.get('model')}",
        "",
        f"- prompts: {report['prompts'].get('name')} ({report['prompts'].get('num_images')} images, "
        f"source `{report['prompts'].get('source')}`)",
        f"- steps: {report.get('num_steps')}; seeds: {report['seeds']['rule']} (base {report['seeds']['base_seed']})",
        f"- processes: {report.get('world_size')}; device: {report.get('device')}",
        "- latency: " + (", ".join(f"{k} {v}" for k, v in report["latency_protocol"].items())
                         if report.get("latency_protocol") else "not measured"),
        "",
        "| schedule | speedup | latency / image (s, median ± IQR) | MACs ratio | "
        + " | ".join(m + arrows[m] for m in metric_names) + " |",
        "|---|---|---|---|" + "---|" * len(metric_names),
    ]
    for name, s in scheds.items():
        lat = s.get("latency") or {}
        lat_txt = f"{_fmt(lat.get('per_image_s'))} ± {_fmt(lat.get('per_image_iqr_s'))}" if lat else "-"
        row = [name, _fmt(s.get("speedup"), 3), lat_txt, _fmt(s.get("macs_ratio"), 3)]
        row += [_fmt(s.get("metrics", {}).get(m)) for m in metric_names]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Speedup and MACs ratio are against the uncached model measured in the same run.", ""]
    lines += ["## How the metrics were computed", ""]
    for name, info in report.get("metrics_info", {}).items():
        lines.append(f"- **{name}**: " + "; ".join(f"{k}: {_fmt(v)}" for k, v in info.items() if v is not None))
    for extra in ("grid", "tradeoff_plot"):
        if report.get(extra):
            lines += ["", f"![{extra}]({report[extra]})"]
    return "\n".join(lines) + "\n"


def save_grid(columns: dict[str, torch.Tensor], prompts: list[str], path: str | os.PathLike) -> None:
    """PNG grid: one row per sample prompt, one column per schedule (uncached first), same seed along a row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(columns)
    rows = min(len(prompts), *(len(v) for v in columns.values()))
    fig, axes = plt.subplots(rows, len(names), figsize=(1.9 * len(names), 1.9 * rows + 0.4), squeeze=False)
    for c, name in enumerate(names):
        for r in range(rows):
            ax = axes[r][c]
            ax.imshow(columns[name][r].permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=8)
            if c == 0:
                text = prompts[r] if len(prompts[r]) <= 28 else prompts[r][:27] + "…"
                ax.set_ylabel(text, fontsize=6)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def save_tradeoff_plot(report: dict[str, Any], path: str | os.PathLike) -> None:
    """One panel per metric: metric value against measured speedup, one labelled point per schedule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scheds = report["schedules"]
    metric_names = sorted({m for s in scheds.values() for m in s.get("metrics", {}) if m != "kid_std"})
    if not metric_names:
        return
    ncols = min(3, len(metric_names))
    nrows = -(-len(metric_names) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[len(metric_names):]:
        ax.set_visible(False)
    colors = {name: f"C{i % 10}" for i, name in enumerate(scheds)}  # one colour per schedule in every panel
    for ax, m in zip(flat, metric_names):
        for name, s in scheds.items():
            v, x = s.get("metrics", {}).get(m), s.get("speedup")
            if isinstance(v, (int, float)) and math.isfinite(v) and x is not None:
                ax.scatter([x], [v], s=24, color=colors[name])
                ax.annotate(name, (x, v), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("speedup vs uncached (×)")
        ax.set_ylabel(m + (" (lower is better)" if m in _LOWER_IS_BETTER else " (higher is better)"))
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
        ax.grid(alpha=0.3)
    fig.suptitle(f"quality vs speedup — {report.get('model')}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def write_report(
    report: dict[str, Any],
    out_dir: str | os.PathLike,
    grid_columns: dict[str, torch.Tensor] | None = None,
    grid_prompts: list[str] | None = None,
) -> dict[str, Path]:
    """Write report.json, report.md, grid.png (if samples given) and tradeoff.png (if more than one schedule)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    if grid_columns:
        paths["grid"] = out / "grid.png"
        save_grid(grid_columns, grid_prompts or [], paths["grid"])
        report["grid"] = "grid.png"
    return _finish_report(report, out, paths, render_markdown)


def _finish_report(report: dict[str, Any], out: Path, paths: dict[str, Path],
                   render: Callable[[dict[str, Any]], str]) -> dict[str, Path]:
    """tradeoff.png when there are several plans, then report.json and report.md, last, since they name the figures."""
    if len([k for k in report["schedules"] if k != "uncached"]) > 1:
        paths["tradeoff_plot"] = out / "tradeoff.png"
        save_tradeoff_plot(report, paths["tradeoff_plot"])
        report["tradeoff_plot"] = "tradeoff.png"
    paths["json"] = out / "report.json"
    write_json(report, paths["json"])
    paths["markdown"] = out / "report.md"
    write_text(paths["markdown"], render(report))
    return paths


# ------------------------------------------------------------------------------------------------------- video
_VIDEO_COLUMNS = (("fid", "FID ↓"), ("kid", "KID ↓"), ("fvd", "FVD ↓"), ("clip", "CLIP ↑"),
                  ("temporal", "temporal ↑"), ("psnr", "PSNR ↑"), ("ssim", "SSIM ↑"),
                  ("digit_frames", "digit frames ↑"), ("digit_clips", "digit clips ↑"), ("direction", "direction ↑"))


def render_video_markdown(report: dict[str, Any]) -> str:
    """The video report for people: one table (each plan, the uncached model, the real-data floor), then how."""
    scheds, real = report["schedules"], report.get("real") or {}
    shown = [(k, label) for k, label in _VIDEO_COLUMNS
             if any(k in s.get("metrics", {}) for s in [*scheds.values(), real])]
    protocol = report.get("latency_protocol") or {}
    clips = protocol.get("clips_per_call")
    lines = [
        f"# cachekit video evaluation: {report.get('model')}",
        "",
        f"- prompts: {report['prompts'].get('name')} ({report['prompts'].get('num_clips')} clips, "
        f"source `{report['prompts'].get('source')}`, seed {report['prompts'].get('seed')})",
        f"- steps: {report.get('num_steps')}; seeds: {report['seeds']['rule']} (base {report['seeds']['base_seed']})",
        f"- device: {report.get('device')}",
        "- latency: " + (", ".join(f"{k} {v}" for k, v in protocol.items()) if protocol else "not measured"),
        "",
        f"| configuration | speedup | time for {clips or '-'} clips (s) | s / clip | MACs ratio | "
        + " | ".join(label for _, label in shown) + " |",
        "|---|---|---|---|---|" + "---|" * len(shown),
    ]
    for name, s in scheds.items():
        row = [name, _fmt(s.get("speedup"), 3), _fmt(s.get("seconds_per_call"), 3), _fmt(s.get("latency_s"), 3),
               _fmt(s.get("macs_ratio"), 3)]
        lines.append("| " + " | ".join(row + [_fmt(s["metrics"].get(k)) for k, _ in shown]) + " |")
    if real:
        row = [f"real clips ({real.get('source')})", "-", "-", "-", "-"]
        lines.append("| " + " | ".join(row + [_fmt(real["metrics"].get(k)) for k, _ in shown]) + " |")
    lines += [
        "",
        "Speedup and MACs ratio are against the uncached model measured in the same run. PSNR / SSIM compare each "
        "frame with the uncached clip's. The real-clips row is the floor (FID, KID, FVD) or ceiling (the rest) of "
        "the same metrics: " + str(real.get("why", "")) + ".",
        "",
    ]
    if report.get("reference"):
        lines += ["Reference: " + ", ".join(f"{k} {_fmt(v)}" for k, v in report["reference"].items()), ""]
    for key, title in (("strips", "Frame strips (per prompt: uncached row, then each plan)"),
                       ("preview", "Animated preview (rows: prompts; columns: uncached, then each plan)"),
                       ("per_frame_plot", "Along the clip"), ("tradeoff_plot", "Quality against speedup")):
        if report.get(key):
            lines += [f"## {title}", "", f"![{key}]({report[key]})", ""]
    if report.get("preview_error"):
        lines += [f"(no animated preview: {report['preview_error']})", ""]
    lines += ["## How the metrics were computed", ""]
    for name, info in report.get("metrics_info", {}).items():
        lines.append(f"- **{name}**: " + "; ".join(f"{k}: {_fmt(v)}" for k, v in info.items() if v is not None))
    return "\n".join(lines) + "\n"


def save_frame_strips(columns: dict[str, torch.Tensor], prompts: list[str], path: str | os.PathLike) -> None:
    """PNG of frame strips: for each sample prompt the uncached clip's frames in a row, each plan's row below it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(columns)
    samples = min(len(prompts), *(len(v) for v in columns.values()))
    frames = next(iter(columns.values())).shape[1]
    rows = samples * len(names)
    fig, axes = plt.subplots(rows, frames, figsize=(0.95 * frames + 1.6, 0.95 * rows + 0.3), squeeze=False)
    for s in range(samples):
        for c, name in enumerate(names):
            r = s * len(names) + c
            for t in range(frames):
                ax = axes[r][t]
                ax.imshow(columns[name][s, t].permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(f"frame {t}", fontsize=7)
            label = name if c else f"{prompts[s][:30]}\n{name}"
            axes[r][0].set_ylabel(label, fontsize=6, rotation=0, ha="right", va="center")
    fig.tight_layout(h_pad=0.2, w_pad=0.1)
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def preview_frames(columns: dict[str, torch.Tensor], gap: int = 2) -> torch.Tensor:
    """One animation of every sample clip side by side: `[F, 3, H', W']` uint8, rows the prompts, columns the
    configurations (uncached first), separated by `gap` grey pixels."""
    clips = list(columns.values())
    samples = min(len(v) for v in clips)
    f, _, h, w = clips[0].shape[1:]
    canvas = torch.full((f, 3, samples * (h + gap) - gap, len(clips) * (w + gap) - gap), 96, dtype=torch.uint8)
    for c, video in enumerate(clips):
        for s in range(samples):
            canvas[:, :, s * (h + gap):s * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = video[s]
    return canvas


def save_per_frame_plot(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Two panels along the clip: each plan's PSNR against the uncached frame, and how often each frame shows the
    prompted digit (every configuration, and real clips dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scheds, real = report["schedules"], report.get("real") or {}
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    colors = {name: f"C{i % 10}" for i, name in enumerate(scheds)}
    for name, s in scheds.items():
        per = s.get("per_frame", {})
        psnr = [v if isinstance(v, (int, float)) and math.isfinite(v) else float("nan") for v in per.get("psnr", [])]
        if psnr:
            left.plot(range(len(psnr)), psnr, marker="o", ms=3, color=colors[name], label=name)
        if per.get("digit"):
            right.plot(range(len(per["digit"])), per["digit"], marker="o", ms=3, color=colors[name], label=name)
    if (real.get("per_frame") or {}).get("digit"):
        right.plot(range(len(real["per_frame"]["digit"])), real["per_frame"]["digit"], ls="--", color="k",
                   label="real clips")
    left.set_title("PSNR against the uncached clip (dB)", fontsize=9)
    right.set_title("clips whose frame shows the prompted digit", fontsize=9)
    right.set_ylim(0, 1.02)
    for ax in (left, right):
        ax.set_xlabel("frame")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"along the clip — {report.get('model')}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def write_video_report(
    report: dict[str, Any],
    out_dir: str | os.PathLike,
    columns: dict[str, torch.Tensor] | None = None,
    prompts: list[str] | None = None,
    fps: float = 4,
) -> dict[str, Path]:
    """Write report.json, report.md, strips.png and preview.gif (with sample clips), per_frame.png, and with
    several plans tradeoff.png. The preview needs PyAV (`cachekit[video]`); without it the report says so."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    if columns:
        paths["strips"] = out / "strips.png"
        save_frame_strips(columns, prompts or [], paths["strips"])
        report["strips"] = "strips.png"
        from cachekit.pipelines.video_io import VideoDependencyError, upscale_factor, write_video

        animation = preview_frames(columns)
        scale = upscale_factor(*animation.shape[-2:], min_side=256)  # 32x32 clips: big enough to see the digits
        try:
            paths["preview"] = write_video(animation, out / "preview.gif", fps=fps, scale=scale)
            report["preview"] = "preview.gif"
        except VideoDependencyError as err:
            report["preview_error"] = str(err)
    paths["per_frame_plot"] = out / "per_frame.png"
    save_per_frame_plot(report, paths["per_frame_plot"])
    report["per_frame_plot"] = "per_frame.png"
    return _finish_report(report, out, paths, render_video_markdown)
