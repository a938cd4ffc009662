"""The bundled digits-video model's quality and speed: the per-frame check, per-frame FID against its real-data floor,
and the time for 8 clips, uncached and under a cache plan.

Prints figures measured in one run, never asserts them. For each of N held-out-style prompts ("a handwritten 3
moving left", ...) one clip is generated (9 frames, 32x32, the zoo's call defaults, seed i for prompt i), uncached
and under each plan, and measured by `cachekit.eval.video.evaluate_video` (what `cachekit eval --model digits-video`
runs):

- the per-frame check (`cachekit.zoo.digits_video_check`): the digit of every frame from a box-centred 16x16 crop
  through the project's digit classifier (trained on held-out digits only), the direction from the tracked ink
  centre; the same check on real clips is printed beside it as the check's own ceiling;
- per-frame FID and KID against the frames of held-out real clips, beside the real-data floor: as many real
  train-split clips against the same reference (in the digits CLIP's image space by default, which takes
  milliseconds on CPU; `--fid-features inception` for the FID Inception, minutes on CPU);
- CLIP score on digit crops, temporal consistency, PSNR / SSIM against the uncached clips;
- the time for 8 clips: one call generating 8 clips, each configuration warmed up, then timed round-robin, so the
  speedup is a ratio measured in one run.

    python benchmarks/digits_video.py --num 40 --steps 20 --threads 1
"""

from __future__ import annotations

import argparse
import hashlib
import json

import torch

from cachekit import zoo
from cachekit.eval.suite import MetricConfig
from cachekit.eval.video import VideoMetricFactory, evaluate_video, video_prompt_set
from cachekit.plans import resolve_plan
from cachekit.zoo.digits_video_check import check_real_clips


def _weights_sha(model: str = "digits-video") -> str:
    path = zoo.pipeline_path(model) / "transformer" / "diffusion_pytorch_model.safetensors"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def _round(values: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in values.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="digits-video",
                        help="the bundled digits-video model (default) or a folder the trainer wrote")
    parser.add_argument("--num", type=int, default=40, help="clips (default 40)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    parser.add_argument("--seed", type=int, default=11, help="prompt-list seed (default 11)")
    parser.add_argument("--plans", nargs="*", default=["fora:interval=2"],
                        help="cache plans measured beside the uncached model (default fora:interval=2)")
    parser.add_argument("--fid-features", default="clip", choices=["clip", "inception"],
                        help="FID/KID feature space (default clip: the digits CLIP image tower)")
    parser.add_argument("--ref-clips", type=int, default=100, help="held-out real clips of the reference")
    parser.add_argument("--timing-clips", type=int, default=8, help="clips per timed call (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's; 1 is fastest on a shared 2-core machine)")
    parser.add_argument("--out", default=None, help="also write the report (strips, preview, plots) here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    factory = VideoMetricFactory(MetricConfig(names=[], fid_features=args.fid_features),
                                 "fid,kid,clip,temporal,psnr,ssim,motion", reference_clips_num=args.ref_clips)
    pipe = zoo.load_pipeline(args.model)
    plans = {spec: resolve_plan(spec, pipe.transformer, args.steps) for spec in args.plans}
    report = evaluate_video(pipe, plans, video_prompt_set(args.num, seed=args.seed), args.steps, factory, args.out,
                            batch_size=8, pipe_kwargs=zoo.call_defaults("digits-video"), model_name="digits-video",
                            repeats=args.repeats, timing_clips=args.timing_clips)
    clips = report["latency_protocol"]["clips_per_call"]
    real = report["real"]["metrics"]
    rows = {}
    for name, s in report["schedules"].items():
        m = s["metrics"]
        rows[name] = {
            "check": {"clips": args.num, "digit_frames": round(m["digit_frames"], 4),
                      "digit_clips": round(m["digit_clips"], 4), "direction": round(m["direction"], 4)},
            "fid": round(m["fid"], 3), "fid_over_floor": round(m["fid"] / real["fid"], 2),
            "kid": round(m["kid"], 4), "clip": round(m["clip"], 2), "temporal": round(m["temporal"], 4),
            **({"psnr": round(m["psnr"], 2), "ssim": round(m["ssim"], 4)} if "psnr" in m else {}),
            f"seconds_for_{clips}_clips": round(s["seconds_per_call"], 3),
            "seconds_per_clip": round(s["latency_s"], 3), "speedup": round(s["speedup"], 3),
            "macs_ratio": round(s["macs_ratio"], 3) if s.get("macs_ratio") is not None else None,
        }
    print(json.dumps({
        "steps": args.steps, "weights_sha256": _weights_sha(args.model), "fid_features": args.fid_features,
        "reference": report["reference"], "configs": rows,
        "real_floor": {"source": report["real"]["source"], "clips": report["real"]["clips"], **_round(real)},
        "real_clips_check": check_real_clips().as_dict(), "torch_threads": torch.get_num_threads(),
    }, indent=1))


if __name__ == "__main__":
    main()
