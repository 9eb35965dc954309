"""A CLIP-style byte-level BPE tokenizer trained on our own captions.

Same recipe as OpenAI CLIP (and so SD): lowercase + whitespace cleanup, CLIP's word-splitting regex,
byte-level symbols, a ``</w>`` end-of-word suffix, ``<|startoftext|>``/``<|endoftext|>`` specials and
pad = eos. The vocabulary is laid out like CLIP's: 256 byte symbols, the same 256 with ``</w>``,
one token per merge, then the two specials last. Saved as ``vocab.json`` + ``merges.txt`` (+
``tokenizer.json`` etc. from ``save_pretrained``), so ``CLIPTokenizer.from_pretrained`` loads it.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from tokenizers import Regex, normalizers, pre_tokenizers
from transformers import CLIPTokenizer

from harness.pathologies import CHEXPERT_LABELS, FINDINGS

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
EOW = "</w>"
# CLIP's pre-tokenizer regex (copied from transformers' CLIPTokenizer so both split text the same way).
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

# Our prompts are short ("a frontal chest x-ray showing cardiomegaly and edema" is ~12 tokens, all
# five findings ~20); 32 instead of CLIP's 77 makes every text-encoder pass ~2.5x cheaper.
MODEL_MAX_LENGTH = 32


def medical_corpus() -> list[str]:
    """Medical words the fine-tuning prompts use, so they tokenize into whole words.

    The base never sees an X-ray paired with these words (like real SD, whose vocabulary knows
    "cardiomegaly" without having learned to draw it)."""
    names = [n.lower() for n in dict.fromkeys(FINDINGS + CHEXPERT_LABELS)]
    views = ["frontal", "lateral", "pa", "ap", "posteroanterior", "anteroposterior"]
    lines = [f"a {v} chest x-ray showing {n}" for v in views for n in names]
    lines += [f"a {v} chest x-ray with {n}" for v in views for n in names]
    lines += [f"a {v} chest x-ray, no finding" for v in views]
    lines += ["a chest x-ray", "a chest radiograph", "a frontal view", "a lateral view", "no finding",
              "normal chest x-ray", "an x-ray of the chest", "with", "showing", "and", "without",
              "mild", "moderate", "severe", "small", "large", "left", "right", "bilateral", "lung",
              "lungs", "heart", "view", "image", "photo", "radiograph", "xray", "x-ray"]
    lines.append(", ".join(names))
    return lines


def _bytes_to_unicode() -> list[str]:
    """CLIP/GPT-2's printable stand-ins for the 256 byte values, in CLIP's vocabulary order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _train_merges(corpus: list[str], n_merges: int) -> list[tuple[str, str]]:
    """Learn BPE merges on ``corpus`` with CLIP's normalizer and word splitting: the most frequent
    pair first, ties broken by the pair itself. Not tokenizers' BpeTrainer: it breaks count ties in
    hash-map order, so one build recipe gave other token ids in every process (huggingface/tokenizers#1794)."""
    normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    splitter = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    counts = Counter(w for line in corpus for w, _ in splitter.pre_tokenize_str(normalizer.normalize_str(line)))
    words = {tuple(w[:-1]) + (w[-1] + EOW,): c for w, c in sorted(counts.items())}
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs = Counter()
        for symbols, c in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += c
        if not pairs:  # every word is one token
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        words = {_merge(symbols, best): c for symbols, c in words.items()}
    return merges


def _merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(symbols):
        if symbols[i:i + 2] == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def build_tokenizer(corpus: list[str], out_dir: str | os.PathLike | None = None, vocab_size: int = 2048,
                    model_max_length: int = MODEL_MAX_LENGTH) -> CLIPTokenizer:
    """Train a CLIP-style BPE vocabulary on ``corpus`` and (if ``out_dir``) save it loadably.

    vocab_size counts everything (512 byte symbols + merges + 2 specials). 2048 leaves ~1500 merges,
    enough for every word of our captions + medical corpus to become a single token; the embedding
    table stays small (2048 x hidden) for the CPU text encoder.
    """
    n_merges = vocab_size - 512 - 2
    if n_merges < 0:
        raise ValueError(f"vocab_size must be >= 514 (512 byte symbols + 2 specials), got {vocab_size}")
    byte_syms = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for s in byte_syms + [b + EOW for b in byte_syms]:
        vocab[s] = len(vocab)
    merges = []
    for a, b in _train_merges(list(corpus), n_merges):
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
            merges.append((a, b))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)

    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    if out_dir is not None:
        out_dir = Path(out_dir)
        tokenizer.save_pretrained(out_dir)
        # The slow-tokenizer files too, as in openai/clip-vit-large-patch14 (other tools read them).
        (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        with open(out_dir / "merges.txt", "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
            f.writelines(f"{a} {b}\n" for a, b in merges)
    return tokenizer
