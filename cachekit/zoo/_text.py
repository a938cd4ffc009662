"""Word-level tokenizers for the digits models, built from the caption vocabulary (no download, no sentencepiece)."""

from __future__ import annotations

from typing import Sequence

from .digits_data import vocabulary


def build_word_tokenizer(specials: Sequence[str], eos: str, pad: str, unk: str, bos: str | None = None,
                         append: Sequence[str] = (), model_max_length: int = 512):
    """A ``transformers.PreTrainedTokenizerFast`` over the caption words.

    ``specials`` get the first ids in order, then the caption words, then ``append`` (so a token can be made the
    highest id, as open_clip's ``argmax`` pooling expects of the end-of-text token). Lower-cases, splits on whitespace
    and punctuation, appends ``eos`` (and prepends ``bos`` if given) to every sequence.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {}
    for tok in list(specials) + vocabulary() + list(append):
        if tok not in vocab:
            vocab[tok] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tk.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    single = (f"{bos} $A {eos}" if bos else f"$A {eos}")
    special_ids = [(eos, vocab[eos])] + ([(bos, vocab[bos])] if bos else [])
    tk.post_processor = processors.TemplateProcessing(single=single, special_tokens=special_ids)
    kwargs = dict(pad_token=pad, eos_token=eos, unk_token=unk)
    if bos:
        kwargs["bos_token"] = bos
    return PreTrainedTokenizerFast(tokenizer_object=tk, model_max_length=model_max_length, **kwargs)


def patch_tokenizer_class(folder) -> None:
    """Name the tokenizer class ``PreTrainedTokenizerFast`` in ``tokenizer_config.json``.

    transformers 5 writes ``TokenizersBackend``, a name transformers 4.x does not know; both know
    ``PreTrainedTokenizerFast``, which loads the same ``tokenizer.json``.
    """
    import json
    from pathlib import Path

    path = Path(folder) / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
