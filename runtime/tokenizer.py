"""Tokenizer: a thin wrapper over a Hugging Face `tokenizers` tokenizer.json.

Works on FastSLM's tokenizer (Qwen3's byte-level BPE plus the chat markers and FastSLM's 9
special tokens) and on the small one `train_bpe_tokenizer` makes for demo models and tests.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from .errors import ModelFileError, OptionError
from .prompt import (
    AUDIO, AUDIO_BOS, AUDIO_EOS, CHAT_TOKENS, ENDOFTEXT, IM_END, SPECIAL_TOKENS, THINK_TOKENS, PromptIds, check_text,
)

# Qwen2/Qwen3's pre-tokenizer split (tokenizer.json "Split" pattern), so the demo tokenizer
# cuts text the way the real one does.
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def read_tokenizer_file(path: str | Path, restore: str = "restore it from the model") -> tokenizers.Tokenizer:
    """A tokenizer.json -> `tokenizers.Tokenizer`, or one ModelFileError line saying what to do."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"tokenizer file {path} is missing: the model folder needs its tokenizer.json")
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises a bare Exception for any parse error
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ModelFileError(f"tokenizer file {path} is unreadable ({reason}): {restore}") from None


class Tokenizer:
    """Encode/decode text and FastSLM prompts; ids are plain Python ints."""

    def __init__(self, tokenizer: tokenizers.Tokenizer):
        self._tok = tokenizer
        added = tokenizer.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, t in added.items() if t.special)
        # (<think>, </think>) ids, or None where the tokenizer has no such tokens
        think = tuple(tokenizer.token_to_id(t) for t in THINK_TOKENS)
        self.think_ids: tuple[int, int] | None = think if None not in think else None

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        return cls(read_tokenizer_file(path))

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce, added tokens included (may be < the embedding rows)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of all added tokens marked special (skipped by `decode` by default)."""
        return self._special_ids

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Ids that end generation: <|im_end|> (end of the assistant turn) and <|endoftext|>."""
        ids = (self._tok.token_to_id(t) for t in (IM_END, ENDOFTEXT))
        return tuple(i for i in ids if i is not None)

    def token_id(self, token: str) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise ModelFileError(
                f"the tokenizer has no token {token}: use the tokenizer.json that came with the model"
            )
        return tid

    def encode(self, text: str) -> list[int]:
        check_text(text, "the text to encode")
        # add_special_tokens=False: Qwen3 has no BOS and the chat markers are in the text.
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = list(ids)
        bad = next((i for i in ids if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0), None)
        if bad is not None:  # the Rust side would raise OverflowError / TypeError
            raise OptionError(f"token id {bad!r} is not a token id: ids are whole numbers >= 0")
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def split_thinking(self, ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """(thinking ids, answer ids) of generated ids.

        A reply that opens with `<think>` reasons first and answers after `</think>` (Qwen3's
        thinking format; the demo model writes out what it heard there before answering a question).
        The block is not part of the answer. Without its `</think>` (cut by max_new_tokens) nothing
        is split off: all of it is the answer, as in Qwen3's own parsing.
        """
        ids = list(ids)
        if self.think_ids is None or not ids or ids[0] != self.think_ids[0] or self.think_ids[1] not in ids:
            return [], ids
        end = ids.index(self.think_ids[1]) + 1
        return ids[:end], ids[end:]

    def decode_answer(self, ids: Sequence[int]) -> tuple[str, str]:
        """(answer text, thinking text) of generated ids; the thinking text is without its markers."""
        thinking, answer = self.split_thinking(ids)
        return self.decode(answer).strip(), self.decode(thinking[1:-1]).strip()

    def encode_prompt(self, text: str) -> PromptIds:
        """Split a built prompt at its one <|AUDIO|>: left ends with <|audio_bos|>, right starts with <|audio_eos|>."""
        ids = self.encode(text)
        audio = self.token_id(AUDIO)
        at = [i for i, t in enumerate(ids) if t == audio]
        if len(at) != 1:
            raise OptionError(f"the prompt holds {AUDIO} {len(at)} times, not once: build it with build_prompt")
        i = at[0]
        if i == 0 or ids[i - 1] != self.token_id(AUDIO_BOS) or ids[i + 1:i + 2] != [self.token_id(AUDIO_EOS)]:
            raise OptionError(f"{AUDIO} must sit between {AUDIO_BOS} and {AUDIO_EOS}: build it with build_prompt")
        return PromptIds(left=tuple(ids[:i]), right=tuple(ids[i + 1:]))


class StreamDecoder:
    """Incremental detokenization: `add` one id at a time, print what comes back.

    tokenizers' own `DecodeStream` does the work (it holds a byte-level token that ends inside a
    multi-byte UTF-8 character back until a later one completes it). It has no end of stream,
    so `flush` decodes the ids still held (a truncated character shows as U+FFFD), and the
    pieces plus `flush()` add up exactly to `decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._stream = decoders.DecodeStream(skip_special_tokens=skip_special_tokens)
        self._held: list[int] = []  # ids since the last piece: what flush still owes

    def add(self, token_id: int) -> str:
        if isinstance(token_id, bool) or not isinstance(token_id, (int, np.integer)) or token_id < 0:
            raise OptionError(f"token id {token_id!r} is not a token id: ids are whole numbers >= 0")
        piece = self._stream.step(self._tok._tok, int(token_id))
        if not piece:
            self._held.append(int(token_id))
            return ""
        self._held = []
        return piece

    def flush(self) -> str:
        """Emit whatever is held back (a truncated character shows as U+FFFD)."""
        tail = self._tok.decode(self._held, self._skip) if self._held else ""
        self._held = []
        return tail


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> tokenizers.Tokenizer:
    """A small Qwen-style byte-level BPE tokenizer for demo models and tests.

    Same pipeline as Qwen3's tokenizer.json (NFC, Qwen's split regex, byte-level, no BOS);
    `vocab_size` counts the learned BPE vocabulary (256 bytes + merges). As in Qwen3, the
    added tokens come after it: CHAT_TOKENS, <think> </think> (not special), then
    FastSLM's SPECIAL_TOKENS in the reference order.
    """
    if vocab_size < 256:
        raise OptionError(f"vocab_size {vocab_size} is below the 256 byte tokens: use at least 256")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(QWEN_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens(list(CHAT_TOKENS))
    tok.add_tokens(list(THINK_TOKENS))
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok
