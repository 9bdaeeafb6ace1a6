"""Write the tiny CLIP-style BPE tokenizer used by configs/tiny/forecast.yaml (run once; the output is committed).

Its vocabulary is the 256 byte-level symbols (alone and word-final) plus the whole words of the paper's fixed
prompt (built by merges), so the prompt fits in 77 tokens and the tiny text encoders see real, deterministic ids.
"""

from __future__ import annotations

import re
from pathlib import Path

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from networks.sd3 import PAPER_PROMPT

OUTPUT = Path(__file__).resolve().parent / "tokenizer"
MAX_LENGTH = 77


def byte_level_vocab(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Special tokens, every byte symbol as word piece and as word end, and left-to-right merges spelling `words`."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in bytes_to_unicode().values():
        vocab.setdefault(symbol, len(vocab))
        vocab.setdefault(f"{symbol}</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in words:
        piece = word[0]
        for index, char in enumerate(word[1:], start=1):
            right = f"{char}</w>" if index == len(word) - 1 else char
            if (piece, right) not in merges:
                merges.append((piece, right))
            piece = piece + right
            vocab.setdefault(piece, len(vocab))
    return vocab, merges


def main() -> None:
    words = sorted({word for word in re.findall(r"[a-z]+", PAPER_PROMPT.lower()) if len(word) > 1})
    vocab, merges = byte_level_vocab(words)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)
    tokenizer.save_pretrained(OUTPUT)
    print(f"wrote {len(vocab)}-token tokenizer to {OUTPUT}")


if __name__ == "__main__":
    main()
