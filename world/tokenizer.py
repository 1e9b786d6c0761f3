"""The world's tokenizer: a real ``CLIPTokenizer`` whose BPE merges make every world word one token.

Any other text still tokenizes (byte-level characters), so a user's prompt never fails; it just means
little to a model that only knows this world.
"""

from __future__ import annotations

from typing import Any

from ..pipeline.tiny import _bytes_to_unicode
from .render import BACKGROUNDS, COLOURS, PATTERNS, POSITIONS, SHAPES

WORDS = sorted({"a", "and", "on", "thing", "background", ",", *COLOURS, *BACKGROUNDS, *PATTERNS, *SHAPES,
                *(w for p in POSITIONS for w in p.split())})


def _merge_words(tokens: list[str], merges: list[tuple[str, str]], pieces_of: dict[str, list[str]]) -> None:
    """Append merges that join each word's current pieces left to right (new tokens go to the vocabulary)."""
    for pieces in pieces_of.values():
        left = pieces[0]
        for right in pieces[1:]:
            if (left, right) not in merges:
                merges.append((left, right))
            left = left + right
            if left not in tokens:
                tokens.append(left)


def world_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges: byte characters (alone and word-final), then merges that build each word.

    A merge learnt for one word can split another ("ri" of "right" inside "striped"), so the words whose
    pieces are not one token yet get merges of their current pieces, until every word is one token.
    """
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    pending = {w: list(w[:-1]) + [w[-1] + "</w>"] for w in WORDS}
    for _ in range(8):
        _merge_words(tokens, merges, pending)
        vocab = {t: i for i, t in enumerate(tokens + ["<|startoftext|>", "<|endoftext|>"])}
        tok = CLIPTokenizer(vocab=vocab, merges=merges)
        pending = {}
        for w in WORDS:
            pieces = tok.convert_ids_to_tokens(tok(w, add_special_tokens=False).input_ids)
            if len(pieces) != 1:
                pending[w] = pieces
        if not pending:
            return vocab, merges
    raise RuntimeError(f"world words without a single token: {sorted(pending)}")


def world_tokenizer(max_length: int = 20) -> Any:
    """The tokenizer of the world's text encoders (captions are at most 14 tokens with start and end)."""
    from transformers import CLIPTokenizer

    vocab, merges = world_vocab()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
