"""Replies that reason in a <think> block before answering (Qwen3's format; the demo model writes out
what it heard there before answering a question): the block is kept out of the answer on every path.

The model's reply is scripted (Pipeline.decode_tokens patched) on the shipped demo bundle, so each
case holds exact ids whatever the weights say.
"""

from __future__ import annotations

import json

import pytest
import tokenizers
from typer.testing import CliRunner

from fastslm.runtime.cli import app as run_app
from fastslm.runtime.generate import Pipeline
from fastslm.runtime.loading import DEFAULT_MODEL_DIR
from fastslm.runtime.sampling import SamplingOptions
from fastslm.runtime.tokenizer import Tokenizer

HEARD = "And so my fellow Americans"
REPLIES = {  # reply text -> (answer, thinking)
    f"<think>\n{HEARD}\n</think>\n\nfellow americans": ("fellow americans", HEARD),
    "<think>\n\n</think>\n\nyes": ("yes", ""),  # Qwen3's empty block
    f"<think>\n{HEARD}": (f"<think>\n{HEARD}", ""),  # cut before </think>: all of it is the answer
    "yes <think>no</think> maybe": ("yes <think>no</think> maybe", ""),  # not at the start: plain text
    "seven": ("seven", ""),
}


@pytest.fixture(scope="module")
def demo() -> Pipeline:
    return Pipeline.load(DEFAULT_MODEL_DIR)


@pytest.fixture
def scripted(monkeypatch):
    """scripted(ids): every reply of every Pipeline is `ids` (cut at max_new_tokens)."""
    def use(ids: list[int]) -> None:
        def decode_tokens(self, prefill, sampling):
            yield from ids[: sampling.max_new_tokens]
        monkeypatch.setattr(Pipeline, "decode_tokens", decode_tokens)
    return use


@pytest.mark.parametrize("reply", REPLIES)
def test_thinking_is_split_from_the_answer(demo, scripted, jfk_path, reply):
    ids = demo.tokenizer.encode(reply)
    answer, thinking = REPLIES[reply]
    assert demo.tokenizer.decode_answer(ids) == (answer, thinking)
    scripted(ids)
    session = demo.open(jfk_path)
    result = session.ask("What is the first word?")
    assert (result.text, result.thinking, result.token_ids) == (answer, thinking, ids)
    streamed = "".join(session.stream("What is the first word?"))
    assert streamed.rstrip() == answer and not streamed[:1].isspace()


def test_the_think_markers_are_single_tokens(demo):
    ids = demo.tokenizer.encode(f"<think>\n{HEARD}\n</think>\n\nfellow")
    thinking, answer = demo.tokenizer.split_thinking(ids)
    assert (thinking[0], thinking[-1]) == demo.tokenizer.think_ids
    assert demo.tokenizer.decode(answer).strip() == "fellow"


def test_a_reply_cut_inside_its_thinking_is_not_lost(demo, scripted, jfk_path):
    ids = demo.tokenizer.encode(f"<think>\n{HEARD}\n</think>\n\nfellow")
    scripted(ids)
    result = demo.generate(jfk_path, "What is the first word?", sampling=SamplingOptions(max_new_tokens=4))
    assert result.thinking == "" and result.text == demo.tokenizer.decode(ids[:4]).strip()
    assert result.text.startswith("<think>")


def test_cli_prints_the_answer_and_json_keeps_the_thinking(demo, scripted, jfk_path):
    scripted(demo.tokenizer.encode(f"<think>\n{HEARD}\n</think>\n\nfellow americans"))
    runner = CliRunner()
    txt = runner.invoke(run_app, [str(jfk_path), "--prompt", "Which words come after my?"])
    assert txt.exit_code == 0, txt.output
    assert txt.stdout.strip() == "fellow americans"
    js = runner.invoke(run_app, [str(jfk_path), "--prompt", "Which words come after my?", "--json"])
    assert js.exit_code == 0, js.output
    record = json.loads(js.stdout)
    assert record["text"] == "fellow americans" and record["thinking"] == HEARD


def test_a_tokenizer_without_think_tokens_splits_nothing(demo):
    raw = json.loads(demo.tokenizer._tok.to_str())
    raw["added_tokens"] = [t for t in raw["added_tokens"] if t["content"] not in ("<think>", "</think>")]
    plain = Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(raw)))
    ids = plain.encode(f"<think>\n{HEARD}\n</think>\n\nyes")
    assert plain.think_ids is None
    assert plain.decode_answer(ids) == (plain.decode(ids).strip(), "")
