"""Train the embedded digits CLIP (open_clip format) on the training split of the bundled sklearn digits.

    python -m cachekit.zoo.train_digits_clip --out cachekit/zoo/digits_clip

A tiny ViT (16x16 images, 4x4 patches, 3 layers, width 64) and a tiny causal text transformer (2 layers, width 64)
over a word-level tokenizer of the caption vocabulary, trained contrastively on (image, caption) pairs of the training
split. With only ten concepts a batch holds many pairs of the same digit, so the contrastive targets are soft: every
caption of the image's digit is a positive (a supervised-contrastive CLIP loss). Seeded; 2 CPU threads.

The folder it writes is a stock open_clip ``local-dir:`` model (``open_clip_config.json``, ``open_clip_model.safetensors``,
tokenizer files), and ``cachekit-digits-clip.json`` is the model config that :func:`cachekit.zoo.register_clip`
registers with ``open_clip.add_model_config``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ._text import build_word_tokenizer, patch_tokenizer_class
from .digits_data import IMAGE_SIZE, TEMPLATES, caption_for, load_split

CLIP_NAME = "cachekit-digits-clip"
CONTEXT_LENGTH = 12
# open_clip's default (OpenAI) normalisation: the same whether loaded by name + checkpoint or as a local dir.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def build_tokenizer():
    # <end_of_text> gets the highest id: open_clip's default text pooling takes the argmax token.
    return build_word_tokenizer(["<pad>", "<unk>"], eos="<end_of_text>", pad="<pad>", unk="<unk>",
                                bos="<start_of_text>", append=["<start_of_text>", "<end_of_text>"],
                                model_max_length=CONTEXT_LENGTH)


def model_config(vocab_size: int) -> dict:
    return {
        "embed_dim": 64,
        "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 3, "width": 64, "head_width": 16, "patch_size": 4,
                       "mlp_ratio": 2.0},
        "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": vocab_size, "width": 64, "heads": 4,
                     "layers": 2, "mlp_ratio": 2.0, "hf_tokenizer_name": CLIP_NAME, "pad_id": 0},
    }


def to_model_input(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [N,3,16,16] -> normalised float, identical to open_clip's preprocess at image_size 16."""
    x = images_uint8.float() / 255.0
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels (zero fill), per image."""
    n = x.shape[0]
    pad = F.pad(x, (max_shift,) * 4, value=float(x.min()))
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    h, w = x.shape[-2:]
    return torch.stack([pad[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, images_uint8, labels, template: int | None = None) -> float:
    """Share of images whose own digit's caption scores highest among the ten digits' captions.

    ``template`` picks one phrasing for all images; None cycles the phrasings over the images.
    """
    model.eval()
    img = F.normalize(model.encode_image(to_model_input(images_uint8)), dim=-1)
    correct = 0
    templates = range(len(TEMPLATES)) if template is None else [template]
    txt = {}
    for t in templates:
        ids = tokenizer([caption_for(d, t) for d in range(10)])
        txt[t] = F.normalize(model.encode_text(ids), dim=-1)
    for i in range(len(labels)):
        t = template if template is not None else i % len(TEMPLATES)
        correct += int((img[i] @ txt[t].T).argmax()) == int(labels[i])
    return correct / len(labels)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(Path(__file__).parent / "digits_clip"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import open_clip
    from open_clip.tokenizer import HFTokenizer
    from safetensors.torch import save_file

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    hf_tok = build_tokenizer()
    hf_tok.save_pretrained(out)
    patch_tokenizer_class(out)
    tokenizer = HFTokenizer(str(out), context_length=CONTEXT_LENGTH)
    cfg = model_config(len(hf_tok))
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}, indent=2) + "\n")
    (out / f"{CLIP_NAME}.json").write_text(json.dumps(cfg, indent=2) + "\n")
    model = open_clip.CLIP(**cfg)

    images, labels = load_split("train")
    x_all = to_model_input(images)
    captions = [caption_for(d, t) for d in range(10) for t in range(len(TEMPLATES))]
    ids_all = tokenizer(captions)
    n_t = len(TEMPLATES)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    model.train()
    bar = tqdm(range(args.steps), desc="clip", dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(len(x_all), (args.batch_size,), generator=gen)
        lab = labels[idx]
        cap = torch.tensor([int(l) * n_t + rng.randrange(n_t) for l in lab.tolist()])
        img = F.normalize(model.encode_image(_shift(x_all[idx], gen)), dim=-1)
        txt = F.normalize(model.encode_text(ids_all[cap]), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
        same = (lab[:, None] == lab[None, :]).float()
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (torch.sum(-target * logits.log_softmax(1), 1).mean()
                      + torch.sum(-target * logits.T.log_softmax(1), 1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")

    model.eval()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "open_clip_model.safetensors"))
    held, held_labels = load_split("heldout")
    info = {
        "zero_shot_heldout_cycled_templates": zero_shot_accuracy(model, tokenizer, held, held_labels),
        "zero_shot_heldout_per_template": [zero_shot_accuracy(model, tokenizer, held, held_labels, t)
                                           for t in range(n_t)],
        "train_minutes": (time.perf_counter() - t0) / 60,
        "args": vars(args),
        "final_loss": loss.item(),
    }
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
