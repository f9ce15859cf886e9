from __future__ import annotations

import random

import pytest

from fastslm.runtime.errors import ModelFileError, OptionError
from fastslm.runtime.prompt import CHAT_TOKENS, SPECIAL_TOKENS, THINK_TOKENS, Task, build_prompt
from fastslm.runtime.tokenizer import StreamDecoder, Tokenizer, train_bpe_tokenizer

from .test_prompt import QWEN3_TEMPLATE

WORDS = (
    "the a speaker audio clip country fellow Americans ask what you can do for your today we talk "
    "about speech models summary question answer translate transcribe window token encoder decoder "
    "naïve café 日本 語 한국어 음성 인식 résumé"
).split()


def sentences(n: int = 200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.choices(WORDS, k=rng.randint(3, 10))
        out.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ","]))
    return out


@pytest.fixture(scope="module")
def raw_tokenizer():
    return train_bpe_tokenizer(sentences(), vocab_size=400)


@pytest.fixture(scope="module")
def tok(raw_tokenizer) -> Tokenizer:
    return Tokenizer(raw_tokenizer)


@pytest.fixture(scope="module")
def tokenizer_file(raw_tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    raw_tokenizer.save(str(path))
    return path


def test_special_tokens_are_single_ids_after_the_bpe_vocab(tok):
    added = CHAT_TOKENS + THINK_TOKENS + SPECIAL_TOKENS
    ids = [tok.token_id(t) for t in added]
    assert ids == list(range(400, 400 + len(added)))  # Qwen's layout: added tokens follow the BPE vocab
    assert tok.vocab_size == 400 + len(added)
    for t, i in zip(added, ids):
        assert tok.encode(t) == [i]
        assert tok.encode(f"hello{t}world").count(i) == 1
    assert tok.special_ids == frozenset(tok.token_id(t) for t in CHAT_TOKENS + SPECIAL_TOKENS)
    assert tok.eos_ids == (tok.token_id("<|im_end|>"), tok.token_id("<|endoftext|>"))


def test_round_trip_and_no_bos(tok):
    for text in sentences(20, seed=1) + ["naïve café 日本", "unseen words: zebra 42 \n\n tabs\tend 🎤"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    assert tok.encode("") == []
    prompt = build_prompt(Task.ASR, "Transcribe this audio clip into text.")
    assert tok.decode(tok.encode(prompt), skip_special_tokens=False) == prompt
    assert tok.decode(tok.encode(prompt)) == "user\n\nTranscribe this audio clip into text.\nassistant\n"


def test_encode_prompt_splits_at_audio(tok):
    prompt = build_prompt(Task.SQQA, "What does the speaker ask?", language="en")
    ids = tok.encode(prompt)
    split = tok.encode_prompt(prompt)
    audio = tok.token_id("<|AUDIO|>")
    assert split.left[-1] == tok.token_id("<|audio_bos|>")
    assert split.right[0] == tok.token_id("<|audio_eos|>")
    assert list(split.left) + [audio] + list(split.right) == ids
    assert len(split) == len(ids) - 1
    user = tok.encode("user\n")
    assert split.left[:1 + len(user)] == (tok.token_id("<|im_start|>"), *user)
    # the instruction only touches the right part: the audio prefix is reusable
    other = tok.encode_prompt(build_prompt(Task.SQQA, "Who speaks?", language="en"))
    assert other.left == split.left and other.right != split.right


@pytest.mark.parametrize(
    "text",
    ["no audio here", "<|audio_bos|><|AUDIO|><|audio_eos|> twice <|audio_bos|><|AUDIO|><|audio_eos|>", "x<|AUDIO|>y"],
)
def test_encode_prompt_needs_one_framed_audio_token(tok, text):
    with pytest.raises(OptionError) as info:
        tok.encode_prompt(text)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("skip", [True, False])
def test_stream_decoder_pieces_add_up(tok, skip):
    texts = ["naïve café 日本", "한국어 음성 인식 🎤 résumé", *sentences(5, seed=3)]
    ids = tok.encode("<|im_start|>assistant\n" + " ".join(texts) + "<|im_end|>")
    stream = StreamDecoder(tok, skip_special_tokens=skip)
    pieces = [stream.add(i) for i in ids]
    pieces.append(stream.flush())
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
    assert not any("\ufffd" in p for p in pieces)
    # a byte-level BPE this small splits CJK characters across tokens: some ids must be held back
    held = [i for i, p in enumerate(pieces[:-1]) if p == ""]
    assert held


def test_stream_decoder_random_ids(tok):
    # arbitrary ids include lone UTF-8 continuation bytes: invalid text must still add up
    rng = random.Random(5)
    for _ in range(50):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 40))]
        stream = StreamDecoder(tok)
        text = "".join(stream.add(i) for i in ids) + stream.flush()
        assert text == tok.decode(ids)


def test_stream_decoder_flush_emits_truncated_character(tok):
    ids = tok.encode("日")
    assert len(ids) > 1  # the character spans several byte tokens
    stream = StreamDecoder(tok)
    assert stream.add(ids[0]) == ""
    assert stream.flush() == tok.decode(ids[:1])  # U+FFFD: the character never completed


def test_from_file(tok, tokenizer_file):
    loaded = Tokenizer.from_file(tokenizer_file)
    text = build_prompt(Task.ASR, "Transcribe this audio clip into text.")
    assert loaded.encode(text) == tok.encode(text)


def test_missing_and_corrupt_file(tmp_path, tokenizer_file):
    with pytest.raises(ModelFileError, match="missing") as info:
        Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert "\n" not in str(info.value)
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text(tokenizer_file.read_text()[:500])
    with pytest.raises(ModelFileError, match="unreadable") as info:
        Tokenizer.from_file(corrupt)
    assert "\n" not in str(info.value)
    with pytest.raises(ModelFileError, match="no token"):
        Tokenizer.from_file(tokenizer_file).token_id("<|nope|>")


def test_vocab_size_below_bytes():
    with pytest.raises(OptionError):
        train_bpe_tokenizer(["a b"], vocab_size=100)


def test_transformers_agrees(raw_tokenizer, tok):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=raw_tokenizer)
    hf.chat_template = QWEN3_TEMPLATE
    for task, instruction in [(Task.ASR, "Transcribe this audio clip into text."), (Task.SQQA, "Who is naïve?")]:
        prompt = build_prompt(task, instruction)
        content = f"{task.token}<|audio_bos|><|AUDIO|><|audio_eos|>\n{instruction}"
        messages = [{"role": "user", "content": content}]
        assert hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == prompt
        assert hf.encode(prompt) == tok.encode(prompt)
        assert hf.encode(prompt, add_special_tokens=False) == tok.encode(prompt)
        ids = tok.encode(prompt)
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids)
