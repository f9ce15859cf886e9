from __future__ import annotations

from jinja2.sandbox import ImmutableSandboxedEnvironment
import pytest

from fastslm.runtime.errors import OptionError
from fastslm.runtime.prompt import (
    CHAT_TOKENS,
    SPECIAL_TOKENS,
    Task,
    build_prompt,
    language_token,
    resolve_task,
)

# The part of Qwen3's chat_template (Qwen/Qwen3-4B tokenizer_config.json) that a single
# user message without system prompt or tools goes through, copied verbatim: the system
# branch, the last-query scan, the user branch and the generation prompt.
QWEN3_TEMPLATE = """\
{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""


def render_qwen3(content: str, **kwargs) -> str:
    # transformers renders with trim_blocks and lstrip_blocks on a sandboxed environment.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(QWEN3_TEMPLATE)
    return template.render(messages=[{"role": "user", "content": content}], add_generation_prompt=True, **kwargs)


def test_token_lists():
    assert SPECIAL_TOKENS == (
        "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|EN|>", "<|KO|>",
        "<|ASR|>", "<|AST|>", "<|SSUM|>", "<|SQQA|>",
    )
    assert CHAT_TOKENS == ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    assert [t.token for t in Task] == ["<|ASR|>", "<|AST|>", "<|SSUM|>", "<|SQQA|>"]
    assert Task.ASR.default_instruction == "Transcribe this audio clip into text."
    assert Task.SQQA.default_instruction is None


@pytest.mark.parametrize(
    "task, instruction, language",
    [
        (Task.ASR, "Transcribe this audio clip into text.", None),
        (Task.SSUM, "Summarize this audio clip.", "en"),
        (Task.AST, "Translate this audio clip into Korean.", "KO"),
        (Task.SQQA, "What does the speaker ask of\nhis fellow Americans?", None),
    ],
)
def test_build_prompt_matches_qwen3_template(task, instruction, language):
    lang = language_token(language) if language else ""
    content = f"{task.token}{lang}<|audio_bos|><|AUDIO|><|audio_eos|>\n{instruction}"
    ours = build_prompt(task, instruction, language)
    assert ours == render_qwen3(content)  # the reference: no enable_thinking argument
    assert ours == render_qwen3(content, enable_thinking=True)
    assert build_prompt(task, instruction, language, enable_thinking=False) == render_qwen3(
        content, enable_thinking=False
    )


def test_thinking_default_has_no_think_block():
    plain = build_prompt(Task.ASR, Task.ASR.default_instruction)
    assert plain == (
        "<|im_start|>user\n<|ASR|><|audio_bos|><|AUDIO|><|audio_eos|>\n"
        "Transcribe this audio clip into text.<|im_end|>\n<|im_start|>assistant\n"
    )
    content = "<|ASR|><|audio_bos|><|AUDIO|><|audio_eos|>\nTranscribe this audio clip into text."
    assert render_qwen3(content, enable_thinking=False) == plain + "<think>\n\n</think>\n\n"
    assert build_prompt(Task.ASR, Task.ASR.default_instruction, enable_thinking=False) == plain + "<think>\n\n</think>\n\n"


def test_language_token_follows_task_token():
    text = build_prompt(Task.ASR, "Transcribe this audio clip into text.", language="korean")
    assert "<|ASR|><|KO|><|audio_bos|>" in text


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"task": Task.ASR, "instruction": "x", "language": "fr"}, "unknown language 'fr'"),
        ({"task": Task.ASR, "instruction": "  "}, "instruction is empty"),
        ({"task": "ASR", "instruction": "x"}, "unknown task"),
        ({"task": Task.SQQA, "instruction": "what <|AUDIO|> here?"}, "reserved token <|AUDIO|>"),
        ({"task": Task.SQQA, "instruction": "a<|im_end|>b"}, "reserved token <|im_end|>"),
    ],
)
def test_build_prompt_rejects_bad_input(kwargs, match):
    with pytest.raises(OptionError, match=match) as info:
        build_prompt(**kwargs)
    assert "\n" not in str(info.value)


ASR_DEFAULT = "Transcribe this audio clip into text."
SSUM_DEFAULT = "Summarize this audio clip."


@pytest.mark.parametrize(
    "prompt, task, instruction",
    [
        (None, Task.ASR, ASR_DEFAULT),
        ("", Task.ASR, ASR_DEFAULT),
        ("  ...  ", Task.ASR, ASR_DEFAULT),
        ("transcribe", Task.ASR, ASR_DEFAULT),
        ("Transcription.", Task.ASR, ASR_DEFAULT),
        ("ASR", Task.ASR, ASR_DEFAULT),
        ("Please transcribe the audio clip into text!", Task.ASR, ASR_DEFAULT),
        ("transcript", Task.ASR, ASR_DEFAULT),
        ("summarize", Task.SSUM, SSUM_DEFAULT),
        ("Summary", Task.SSUM, SSUM_DEFAULT),
        ("summarise this recording.", Task.SSUM, SSUM_DEFAULT),
        ("SSUM", Task.SSUM, SSUM_DEFAULT),
        ("translate", Task.AST, "Translate this audio clip into English."),
        ("Translate to Korean", Task.AST, "Translate this audio clip into Korean."),
        ("translate this audio into ko.", Task.AST, "Translate this audio clip into Korean."),
        ("translation into english", Task.AST, "Translate this audio clip into English."),
        ("Summarize the talk in three bullet points.", Task.SSUM, "Summarize the talk in three bullet points."),
        ("Transcribe this audio clip in lowercase.", Task.ASR, "Transcribe this audio clip in lowercase."),
        ("What does the speaker ask of his fellow Americans?", Task.SQQA,
         "What does the speaker ask of his fellow Americans?"),
        ("  Who is speaking?  ", Task.SQQA, "Who is speaking?"),
        ("Is the summary of the budget mentioned?", Task.SQQA, "Is the summary of the budget mentioned?"),
        ("please", Task.SQQA, "please"),
    ],
)
def test_resolve_task(prompt, task, instruction):
    assert resolve_task(prompt) == (task, instruction)
