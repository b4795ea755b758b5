"""Instruction prompt templates, exact to the character, for training and for inference.

`cla_v1` is Chinese-Alpaca's (the default; scripts/training/build_dataset.py of
Chinese-LLaMA-Alpaca), `alpaca` Stanford Alpaca's (PROMPT_DICT in its train.py: the prompt
ends with "### Response:", no newline), `llama2_cla_v2` Chinese-Alpaca-2's (Llama-2 chat
format with its default system prompt). The same function formats the prompt for data
preparation and at generation time, so a model is asked exactly what it was trained on;
`chat_template` writes the same prompt as a Jinja chat template for Hugging Face exports.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class Template:
    """One instruction template; the text fields are `str.format` patterns."""

    no_input: str  # with {instruction}
    with_input: str | None  # with {instruction} and {input}; None: input joined to instruction
    default_system: str | None = None  # for templates with {system}
    # The end of `no_input` that opens the response: a chat template's generation prompt,
    # and what precedes each assistant message of a conversation.
    response_header: str = ""
    # Only for conversations: the later user turns (None: `no_input` again, without input)
    # and what goes between the prompt and an assistant message's text.
    next_turn: str | None = None
    response_sep: str = ""


_CLA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response: "
)
_ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:"
)
_ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
_LLAMA2_PROMPT = "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{instruction} [/INST]"

TEMPLATES = MappingProxyType({
    "cla_v1": Template(_CLA_PROMPT, None, response_header="### Response: "),
    "alpaca": Template(_ALPACA_NO_INPUT, _ALPACA_INPUT, response_header="### Response:"),
    # Conversations as Chinese-Alpaca-2's openai_api_server.py builds them: the system
    # prompt in the first turn only, " " before each response, "</s><s>" between turns.
    "llama2_cla_v2": Template(_LLAMA2_PROMPT, None,
                              "You are a helpful assistant. 你是一个乐于助人的助手。",
                              next_turn="[INST] {instruction} [/INST]", response_sep=" "),
})


def format_prompt(template: str, instruction: str, input: str = "", system: str | None = None) -> str:
    """The prompt for one record, exactly as training saw it (without BOS).

    Args:
        template: a name in TEMPLATES.
        instruction: the user's instruction.
        input: optional context; a non-empty input goes where the template puts it (its own
            block for `alpaca`, else on the line after the instruction).
        system: the system prompt for templates that have one (None: the default).

    Raises:
        ValueError: unknown template.
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose from {', '.join(TEMPLATES)}")
    t = TEMPLATES[template]
    system = t.default_system if system is None else system
    if input and t.with_input is not None:
        return t.with_input.format(instruction=instruction, input=input, system=system)
    if input:  # Chinese-Alpaca: the input follows the instruction on the next line
        instruction = f"{instruction}\n{input}"
    return t.no_input.format(instruction=instruction, system=system)


def _lit(text: str) -> str:
    # a Jinja string literal (Jinja reads JSON's escapes), so no template text is ever
    # taken for Jinja syntax and no whitespace control can eat a newline of it
    return json.dumps(text, ensure_ascii=False)


def _turn_parts(pattern: str, header: str) -> tuple[str, str]:
    head, tail = pattern.split("{instruction}")
    if not tail.endswith(header):
        raise AssertionError(f"template {pattern!r} does not end with {header!r}")
    return head, tail[: len(tail) - len(header)]


def chat_template(template: str) -> str:
    """The Jinja chat template (transformers' `apply_chat_template`) of a template in TEMPLATES.

    A single user message with `add_generation_prompt=True` renders as `bos_token +
    format_prompt(template, content)`: BOS is part of the text because transformers
    tokenizes a rendered chat without adding special tokens, and training put BOS first.
    A leading system message becomes the system prompt of templates that have one
    (`format_prompt(..., system=content)`); the other templates ignore it, as
    `format_prompt` ignores `system`. Later turns alternate assistant and user; each
    assistant message ends with `eos_token`, as in training.

    Raises:
        ValueError: unknown template.
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose from {', '.join(TEMPLATES)}")
    t = TEMPLATES[template]
    head, tail = _turn_parts(t.no_input, t.response_header)
    if "{system}" in head:
        before, after = head.split("{system}")
        first = f"{_lit(before)} + system + {_lit(after)}"
    else:
        first = _lit(head)
    later_head, later_tail = _turn_parts(t.next_turn or t.no_input, t.response_header)
    if "{system}" in later_head:
        raise AssertionError(f"{template}: later turns cannot take a system prompt")
    return "".join((
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
        f"{{%- else -%}}{{%- set system = {_lit(t.default_system or '')} -%}}"
        "{%- set turns = messages -%}{%- endif -%}",
        "{%- for message in turns -%}",
        "{%- if message['role'] != ('user' if loop.index0 is even else 'assistant') -%}",
        "{{- raise_exception('after an optional system message, the roles must alternate "
        "user/assistant/user/...') -}}",
        "{%- elif message['role'] == 'user' and loop.first -%}",
        f"{{{{- bos_token + {first} + message['content'] + {_lit(tail)} -}}}}",
        "{%- elif message['role'] == 'user' -%}",
        f"{{{{- bos_token + {_lit(later_head)} + message['content'] + {_lit(later_tail)} -}}}}",
        "{%- else -%}",
        f"{{{{- {_lit(t.response_header + t.response_sep)} + message['content'] + eos_token -}}}}",
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt and turns and turns[-1]['role'] == 'user' -%}",
        f"{{{{- {_lit(t.response_header)} -}}}}",
        "{%- endif -%}",
    ))


def render_chat(source: str, messages: list[dict], *, bos_token: str, eos_token: str,
                add_generation_prompt: bool = True) -> str:
    """A Jinja chat template (ours from `chat_template`, or a Hugging Face tokenizer's)
    rendered for `messages` as transformers' `apply_chat_template(tokenize=False)` does:
    a sandboxed environment that trims blocks, with `raise_exception` and `tojson`.

    Raises:
        ValueError: the template does not compile, or refuses the messages (its
            `raise_exception`, e.g. roles that do not alternate).
    """
    import jinja2  # torch's own dependency, so always there; imported here as only chats need it
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source).render(messages=messages, bos_token=bos_token,
                                              eos_token=eos_token,
                                              add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template: {e}") from None
