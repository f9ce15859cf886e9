"""FastSLM's prompt: special tokens, tasks, and the Qwen3 chat-template text of one user turn.

The reference renders `[{"role": "user", "content": TASK + AUDIO + "\\n" + instruction}]`
with Qwen3's chat template and `add_generation_prompt=True`, so the prompt text is

    <|im_start|>user\\n<|ASR|><|audio_bos|><|AUDIO|><|audio_eos|>\\n{instruction}<|im_end|>\\n
    <|im_start|>assistant\\n

The runtime splits its ids at <|AUDIO|> (`PromptIds`): left text, then the speech tokens,
then right text. Everything up to <|audio_eos|> does not depend on the instruction, which
is what lets one audio prefix be reused for many questions.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from .errors import OptionError

AUDIO, AUDIO_BOS, AUDIO_EOS = "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"
# The reference adds these with add_special_tokens in this order (audio, language, task),
# so their ids follow one another right after Qwen3's own added tokens.
SPECIAL_TOKENS = (
    AUDIO, AUDIO_BOS, AUDIO_EOS,
    "<|EN|>", "<|KO|>",
    "<|ASR|>", "<|AST|>", "<|SSUM|>", "<|SQQA|>",
)
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
CHAT_TOKENS = (ENDOFTEXT, IM_START, IM_END)
# Qwen3 marks <think> and </think> as added but *not* special: decoding keeps them as text.
THINK_TOKENS = ("<think>", "</think>")


def thinking_reply(thinking: str, answer: str) -> str:
    """A reply in Qwen3's thinking format: the reasoning in a <think> block, then the answer."""
    return f"{THINK_TOKENS[0]}\n{thinking}\n{THINK_TOKENS[1]}\n\n{answer}"


EMPTY_THINK = thinking_reply("", "")  # plain Qwen3's way of switching thinking off

LANGUAGE_TOKENS = {"en": "<|EN|>", "ko": "<|KO|>"}
_LANGUAGE_NAMES = {"english": "en", "korean": "ko"}


class Task(enum.Enum):
    """The four FastSLM tasks; the value is the task token."""

    ASR = "<|ASR|>"
    AST = "<|AST|>"
    SSUM = "<|SSUM|>"
    SQQA = "<|SQQA|>"

    @property
    def token(self) -> str:
        return self.value

    @property
    def default_instruction(self) -> str | None:
        """None for SQQA: there the user's question is the instruction."""
        return _DEFAULT_INSTRUCTIONS[self]


_DEFAULT_INSTRUCTIONS = {
    Task.ASR: "Transcribe this audio clip into text.",
    Task.AST: "Translate this audio clip into English.",
    Task.SSUM: "Summarize this audio clip.",
    Task.SQQA: None,
}

# Optional filler around a task keyword: "please transcribe the audio clip into text".
_OBJECT = r"(?: (?:this|the))?(?: (?:audio(?: clip)?|clip|speech|recording|talk|file))?"
_ASR = re.compile(
    r"(?:please )?(?:asr|stt|transcribe|transcription|transcript|speech recognition)"
    + _OBJECT + r"(?: (?:into|to) text)?"
)
_SSUM = re.compile(
    r"(?:please )?(?:ssum|summarize|summarise|summary|summarization|summarisation)"
    + _OBJECT + r"(?: (?:briefly|in brief))?"
)
_AST = re.compile(r"(?:please )?(?:ast|translate|translation)" + _OBJECT + r"(?: (?:to|into) ([a-z]+))?")
_TASK_VERBS = {"transcribe": Task.ASR, "summarize": Task.SSUM, "summarise": Task.SSUM,
               "translate": Task.AST}


def check_text(text: object, what: str = "the prompt") -> str:
    """`text` if it is a str the tokenizer can take (valid UTF-8), else one OptionError line."""
    if not isinstance(text, str):
        raise OptionError(f"{what} is a {type(text).__name__}, not text: pass a str")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        char = text[exc.start]
        # A command line's undecodable bytes arrive as lone surrogates (PEP 383): name the byte.
        raw = char.encode("utf-8", "surrogateescape") if 0xDC80 <= ord(char) <= 0xDCFF else b""
        shown = f"byte 0x{raw.hex()}" if raw else f"U+{ord(char):04X}"
        raise OptionError(f"{what} is not valid UTF-8 text ({shown} at character {exc.start}): pass UTF-8 text") from None
    return text


def resolve_task(prompt: str | None) -> tuple[Task, str]:
    """Map a user's free-text prompt to `(task, instruction)`.

    The rule, applied to the prompt lower-cased with punctuation turned into spaces:
    1. empty (None, "", only punctuation)            -> ASR, default instruction
    2. only a task keyword with optional filler, e.g. "transcribe", "ASR", "summary",
       "summarize the audio", "translate to Korean"  -> that task, its default instruction
       (for AST with a target: "Translate this audio clip into Korean.")
    3. starts with a task verb (transcribe / summarize / summarise / translate) and says
       more, e.g. "Summarize the talk in three bullets." -> that task, the text as given
    4. anything else (a question)                   -> SQQA, the text as given
    """
    text = check_text(prompt).strip() if prompt is not None else ""
    words = re.sub(r"[^\w]+", " ", text.lower()).strip()
    if not words:
        return Task.ASR, _DEFAULT_INSTRUCTIONS[Task.ASR]
    if _ASR.fullmatch(words):
        return Task.ASR, _DEFAULT_INSTRUCTIONS[Task.ASR]
    if _SSUM.fullmatch(words):
        return Task.SSUM, _DEFAULT_INSTRUCTIONS[Task.SSUM]
    match = _AST.fullmatch(words)
    if match:
        target = match.group(1)
        if target is None:
            return Task.AST, _DEFAULT_INSTRUCTIONS[Task.AST]
        name = {"en": "english", "ko": "korean"}.get(target, target)
        return Task.AST, f"Translate this audio clip into {name.capitalize()}."
    verb = words.removeprefix("please ").split()[0]
    return _TASK_VERBS.get(verb, Task.SQQA), text


def language_token(language: str) -> str:
    """<|EN|> / <|KO|> for a code or English name ("en", "KO", "korean")."""
    key = check_text(language, "the language").strip().lower()
    key = _LANGUAGE_NAMES.get(key, key)
    if key not in LANGUAGE_TOKENS:
        known = ", ".join(LANGUAGE_TOKENS)
        raise OptionError(f"unknown language {language!r}: FastSLM knows {known} (or leave it unset)")
    return LANGUAGE_TOKENS[key]


def build_prompt(
    task: Task,
    instruction: str,
    language: str | None = None,
    enable_thinking: bool | None = None,
) -> str:
    """Qwen3's chat-template text for one user turn plus the generation prompt.

    `enable_thinking` is passed to the template as Qwen3's variable of that name. The
    reference never passes it (None), and Qwen3's template then adds nothing after
    `<|im_start|>assistant\\n`; that is what the FastSLM weights were trained on. Only
    `enable_thinking=False` adds the empty block `<think>\\n\\n</think>\\n\\n` (plain Qwen3's
    way of switching thinking off); True renders like None.
    The language token, when given, follows the task token.
    """
    if not isinstance(task, Task):
        raise OptionError(f"unknown task {task!r}: use one of {', '.join(t.name for t in Task)}")
    if not isinstance(instruction, str) or not instruction.strip():
        raise OptionError("the instruction is empty: give a question or leave the prompt unset for ASR")
    marker = next((t for t in SPECIAL_TOKENS + CHAT_TOKENS if t in instruction), None)
    if marker is not None:
        raise OptionError(f"the instruction contains the reserved token {marker}: remove it")
    lang = language_token(language) if language is not None else ""
    content = f"{task.token}{lang}{AUDIO_BOS}{AUDIO}{AUDIO_EOS}\n{instruction}"
    text = f"{IM_START}user\n{content}{IM_END}\n{IM_START}assistant\n"
    if enable_thinking is False:
        text += EMPTY_THINK
    return text


def build_text_prompt(instruction: str) -> str:
    """A user turn without audio (no task token): for the text-only step of answering past the context."""
    if not isinstance(instruction, str) or not instruction.strip():
        raise OptionError("the instruction is empty")
    return f"{IM_START}user\n{instruction}{IM_END}\n{IM_START}assistant\n"


@dataclass(frozen=True)
class PromptIds:
    """A prompt's ids split at <|AUDIO|>, which is replaced by the speech tokens.

    `left` runs up to and including <|audio_bos|>; `right` starts at <|audio_eos|>.
    """

    left: tuple[int, ...]
    right: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.left) + len(self.right)
