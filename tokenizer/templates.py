"""Instruction prompt templates, exact to the character, for training and for inference.

`cla_v1` is Chinese-Alpaca's (the default; scripts/training/build_dataset.py of
Chinese-LLaMA-Alpaca), `alpaca` Stanford Alpaca's (PROMPT_DICT in its train.py: the prompt
ends with "### Response:", no newline), `llama2_cla_v2` Chinese-Alpaca-2's (Llama-2 chat
format with its default system prompt). The same function formats the prompt for data
preparation and at generation time, so a model is asked exactly what it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class Template:
    no_input: str  # with {instruction}
    with_input: str | None  # with {instruction} and {input}; None: input joined to instruction
    default_system: str | None = None  # for templates with {system}


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
    "cla_v1": Template(_CLA_PROMPT, None),
    "alpaca": Template(_ALPACA_NO_INPUT, _ALPACA_INPUT),
    "llama2_cla_v2": Template(_LLAMA2_PROMPT, None,
                              "You are a helpful assistant. 你是一个乐于助人的助手。"),
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
