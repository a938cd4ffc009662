"""Prompt loaders on small fixture files written here, and the errors a user sees when a file is missing."""

from __future__ import annotations

import json

import pytest

from cachekit.eval import prompts as P


@pytest.fixture
def coco_file(tmp_path):
    anns = []
    for image_id in range(1, 11):
        for k in range(5):
            anns.append({"image_id": image_id, "id": image_id * 100 + k, "caption": f"image {image_id}  caption {k} "})
    data = {"images": [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in range(1, 11)],
            "annotations": anns}
    p = tmp_path / "captions_val2014.json"
    p.write_text(json.dumps(data))
    return p


def test_coco_seeded_sample_one_caption_per_image(coco_file):
    a = P.load_coco_captions(coco_file, num=4, seed=3)
    b = P.load_coco_captions(coco_file, num=4, seed=3)
    c = P.load_coco_captions(coco_file, num=4, seed=4)
    assert a.prompts == b.prompts and a.meta == b.meta
    assert a.prompts != c.prompts or a.meta != c.meta
    ids = [m["image_id"] for m in a.meta]
    assert len(set(ids)) == 4 and ids == sorted(ids)
    for text, m in zip(a.prompts, a.meta):
        assert text.startswith(f"image {m['image_id']} caption ")  # whitespace normalised
        assert m["file_name"] == f"COCO_val2014_{m['image_id']:012d}.jpg"
    assert len(P.load_coco_captions(coco_file, num=None)) == 10


def test_mjhq_category_and_per_category_selection(tmp_path):
    data = {f"id{i:03d}": {"category": ["people", "animals", "food"][i % 3], "prompt": f"prompt {i}"}
            for i in range(30)}
    p = tmp_path / "meta_data.json"
    p.write_text(json.dumps(data))
    only = P.load_mjhq(p, categories=["people", "food"])
    assert len(only) == 20 and {m["category"] for m in only.meta} == {"people", "food"}
    balanced = P.load_mjhq(p, per_category=2, seed=1)
    cats = [m["category"] for m in balanced.meta]
    assert len(balanced) == 6 and all(cats.count(c) == 2 for c in ("people", "animals", "food"))
    assert P.load_mjhq(p, per_category=2, seed=1).prompts == balanced.prompts
    with pytest.raises(ValueError, match="unknown MJHQ categories"):
        P.load_mjhq(p, categories=["cars"])


def test_parti_filters(tmp_path):
    rows = ["Prompt\tCategory\tChallenge\tNote"]
    for i in range(12):
        rows.append(f"a prompt {i}\t{['Animals', 'Vehicles'][i % 2]}\t{['Basic', 'Complex', 'Imagination'][i % 3]}\t")
    p = tmp_path / "PartiPrompts.tsv"
    p.write_text("\n".join(rows) + "\n")
    everything = P.load_parti_prompts(p)
    assert len(everything) == 12
    animals = P.load_parti_prompts(p, categories=["Animals"])
    assert len(animals) == 6 and all(m["category"] == "Animals" for m in animals.meta)
    both = P.load_parti_prompts(p, categories=["Animals"], challenges=["Basic"])
    assert both.prompts == ["a prompt 0", "a prompt 6"]
    with pytest.raises(ValueError, match="unknown PartiPrompts challenge"):
        P.load_parti_prompts(p, challenges=["Hard"])


def test_drawbench_csv_and_text(tmp_path):
    csv_file = tmp_path / "drawbench.csv"
    csv_file.write_text('Prompts,Category\n"A red colored car.",Colors\n"A black colored car.",Colors\n'
                        '"Two cats, one dog.",Counting\n')
    d = P.load_drawbench(csv_file)
    assert d.prompts == ["A red colored car.", "A black colored car.", "Two cats, one dog."]
    assert d.meta[2] == {"category": "Counting"}
    txt = tmp_path / "drawbench.txt"
    txt.write_text("A red colored car.\n\nA black colored car.\n")
    assert P.load_drawbench(txt).prompts == ["A red colored car.", "A black colored car."]


def test_text_and_jsonl(tmp_path):
    t = tmp_path / "mine.txt"
    t.write_text("# my prompts\na cat\n\na dog\na bird\n")
    assert P.load_text_prompts(t).prompts == ["a cat", "a dog", "a bird"]
    assert len(P.load_text_prompts(t, num=2, seed=0)) == 2
    j = tmp_path / "mine.jsonl"
    j.write_text('{"prompt": "a cat", "seed": 1}\n{"caption": "a dog"}\n\n{"text": "a bird"}\n')
    s = P.load_jsonl_prompts(j)
    assert s.prompts == ["a cat", "a dog", "a bird"] and s.meta[0] == {"seed": 1}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        P.load_jsonl_prompts(bad)


def test_digits_builtin_set():
    s = P.digits_prompts(12, seed=0)
    assert len(s) == 12 and [m["label"] for m in s.meta] == [i % 10 for i in range(12)]
    assert P.digits_prompts(12, seed=0).prompts == s.prompts
    assert P.load_prompts("digits", num=5).prompts == s.prompts[:5]


def test_load_prompts_dispatch(tmp_path, coco_file):
    assert P.load_prompts(str(coco_file), num=3).name == "coco"
    assert P.load_prompts(f"coco:{coco_file}", num=3).prompts == P.load_coco_captions(coco_file, num=3).prompts
    (tmp_path / "x.jsonl").write_text('{"prompt": "p"}\n')
    assert P.load_prompts(str(tmp_path / "x.jsonl")).prompts == ["p"]
    (tmp_path / "x.txt").write_text("q\n")
    assert P.load_prompts(str(tmp_path / "x.txt")).prompts == ["q"]


@pytest.mark.parametrize("kind,loader,where", [
    ("coco", P.load_coco_captions, "cocodataset.org"),
    ("mjhq", P.load_mjhq, "playgroundai/MJHQ-30K"),
    ("parti", P.load_parti_prompts, "google-research/parti"),
    ("drawbench", P.load_drawbench, "DrawBench"),
])
def test_missing_benchmark_file_says_where_to_put_and_get_it(tmp_path, monkeypatch, kind, loader, where):
    monkeypatch.setenv("CACHEKIT_DATA", str(tmp_path / "data"))
    with pytest.raises(P.PromptFileNotFoundError) as e:
        loader()
    msg = str(e.value)
    assert str(tmp_path / "data" / kind) in msg and where in msg
    with pytest.raises(P.PromptFileNotFoundError, match="nowhere.json"):
        loader(tmp_path / "nowhere.json")


def test_unknown_prompt_spec_is_a_clear_error(tmp_path):
    with pytest.raises(P.PromptFileNotFoundError, match="neither a built-in name"):
        P.load_prompts(str(tmp_path / "missing.txt"))
