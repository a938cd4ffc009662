"""Measure the embedded digits model: recognition, CLIP zero-shot, speed (and FID when cachekit.eval provides it).

    python benchmarks/digits_model.py [--json out.json]

- Recognition: 200 images at the default settings (20 steps, DIGITS_DEFAULTS guidance), 20 per digit, prompts from
  the built-in "digits" prompt set, fixed seeds. A digit classifier trained ONLY on the held-out split (an RBF SVM on
  8x8 area-pooled grey pixels) must recognise the prompted digit in >= 90 % of them.
- Zero-shot: the digits CLIP, loaded through open_clip, must rank the right caption first (among the ten digits'
  captions, same phrasing; phrasings cycled over images) for >= 90 % of held-out real digits.
- Speed: 40 images at 20 steps with classifier-free guidance, in one pipeline call; median of 3 runs after a warm-up.
- FID: generated vs held-out, through cachekit.eval's FID if it is importable; skipped otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from cachekit.zoo import DIGITS_DEFAULTS, load_clip, load_pipeline
from cachekit.zoo import digits_classifier
from cachekit.zoo.digits_data import TEMPLATES, caption_for, digit_prompts, load_split


def generate(pipe, prompts, seeds, batch_size=40, **overrides):
    """uint8 [N,3,16,16] images for ``prompts``, image i drawn from ``torch.Generator().manual_seed(seeds[i])``."""
    settings = {**DIGITS_DEFAULTS, **overrides}
    out = []
    for s in range(0, len(prompts), batch_size):
        gens = [torch.Generator().manual_seed(int(x)) for x in seeds[s:s + batch_size]]
        imgs = pipe(list(prompts[s:s + batch_size]), generator=gens, output_type="pt", **settings).images
        out.append((imgs.clamp(0, 1) * 255).round().to(torch.uint8))
    return torch.cat(out)


def heldout_classifier():
    """RBF SVM on the held-out split only; its accuracy on the (unseen) train split is reported as a sanity check."""
    clf = digits_classifier.heldout_classifier()
    return clf, digits_classifier.classifier_accuracy(clf)


def recognition(pipe, clf, num=200, **overrides):
    pairs = digit_prompts(num, seed=0)
    prompts = [p for p, _ in pairs]
    labels = np.array([l for _, l in pairs])
    images = generate(pipe, prompts, seeds=list(range(num)), **overrides)
    pred = digits_classifier.recognise(images, clf)
    per_digit = {d: float((pred[labels == d] == d).mean()) for d in range(10)}
    return float((pred == labels).mean()), per_digit, images


@torch.no_grad()
def zero_shot():
    from PIL import Image

    model, preprocess, tokenizer = load_clip("digits")
    held, labels = load_split("heldout")
    x = torch.stack([preprocess(Image.fromarray(im.permute(1, 2, 0).numpy())) for im in held])
    img = torch.nn.functional.normalize(model.encode_image(x), dim=-1)
    txt = {t: torch.nn.functional.normalize(model.encode_text(tokenizer([caption_for(d, t) for d in range(10)])), dim=-1)
           for t in range(len(TEMPLATES))}
    hits = [int((img[i] @ txt[i % len(TEMPLATES)].T).argmax()) == int(labels[i]) for i in range(len(labels))]
    per_template = [float(((img @ txt[t].T).argmax(1) == labels).float().mean()) for t in range(len(TEMPLATES))]
    return float(np.mean(hits)), min(per_template)


def speed(pipe, n=40, repeats=3):
    prompts = [p for p, _ in digit_prompts(n, seed=1)]
    generate(pipe, prompts[:8], seeds=range(8), num_inference_steps=2)  # warm-up
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        generate(pipe, prompts, seeds=range(n), batch_size=n)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def fid_against_heldout(images_uint8: torch.Tensor):
    """FID of images vs the held-out split with cachekit.eval's FID (real Inception); None and a reason if unavailable.

    The evaluation package owns FID, so this benchmark only calls it; it still runs where cachekit[eval] is absent.
    """
    try:
        from cachekit.eval.fid import FID
    except Exception as e:  # noqa: BLE001 - any import problem means "not available"
        return None, f"cachekit.eval not available ({type(e).__name__})"
    try:
        held, _ = load_split("heldout")
        metric = FID()
        metric.update(held, real=True)
        metric.update(images_uint8, real=False)
        return float(metric.compute()), None
    except Exception as e:  # noqa: BLE001 - e.g. Inception weights missing on this machine
        return None, f"cachekit.eval FID failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--guidance", type=float, nargs="*", help="extra guidance scales to report recognition for")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    pipe = load_pipeline("digits")
    pipe.set_progress_bar_config(disable=True)
    res = {"defaults": {k: v for k, v in DIGITS_DEFAULTS.items()}}
    clf, clf_acc = heldout_classifier()
    res["classifier_accuracy_on_train_split"] = clf_acc
    print(f"held-out classifier (RBF SVM, trained on 364 held-out digits): {clf_acc:.1%} on the 1433 train digits")

    acc, per_digit, images = recognition(pipe, clf)
    res["recognition"] = acc
    res["recognition_per_digit"] = per_digit
    print(f"Recognition: {acc:.1%} of 200 generated digits (20 steps, guidance {DIGITS_DEFAULTS['guidance_scale']})"
          f" recognised as the prompted digit   [target >= 90%]")
    print("  per digit: " + ", ".join(f"{d}: {v:.0%}" for d, v in per_digit.items()))
    for g in args.guidance or []:
        a, _, _ = recognition(pipe, clf, guidance_scale=g)
        res[f"recognition_guidance_{g}"] = a
        print(f"  guidance {g}: {a:.1%}")

    zs, zs_worst = zero_shot()
    res["zero_shot"] = zs
    res["zero_shot_worst_template"] = zs_worst
    print(f"Zero-shot: digits CLIP ranks the right caption first for {zs:.1%} of 364 held-out digits "
          f"(worst single phrasing {zs_worst:.1%})   [target >= 90%]")

    med, best = speed(pipe)
    res["seconds_40_images"] = med
    res["seconds_40_images_best"] = best
    print(f"Speed: 40 images, 20 steps, CFG: {med:.2f} s median of 3 (best {best:.2f} s) on "
          f"{torch.get_num_threads()} threads   [target <= 10 s]")

    fid, why = fid_against_heldout(images)
    res["fid_vs_heldout"] = fid
    print(f"FID (200 generated vs 364 held-out): {fid:.2f}" if fid is not None else f"FID: skipped ({why})")
    train, _ = load_split("train")
    floor, why = fid_against_heldout(train)
    res["fid_train_vs_heldout"] = floor
    print(f"FID floor (1433 real train digits vs 364 held-out): {floor:.2f}" if floor is not None
          else f"FID floor: skipped ({why})")

    folder = Path(pipe.config._name_or_path) if hasattr(pipe.config, "_name_or_path") else None
    from cachekit.zoo import clip_path, pipeline_path

    def mb(d):
        return sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file()) / 1e6

    res["pipeline_mb"], res["clip_mb"] = mb(pipeline_path("digits")), mb(clip_path("digits"))
    print(f"Size: pipeline {res['pipeline_mb']:.1f} MB, CLIP {res['clip_mb']:.1f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
