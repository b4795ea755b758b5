"""A small embedded corpus for the toy-scale recipe (`make demo`), so it needs no downloads.

Sentences are built from a few templates and word lists, in English (the "base" language
the toy LLaMA's tokenizer is trained on) and in Chinese (the language the recipe adds).
The output is deterministic for a given seed.
"""

from __future__ import annotations

import random

_NAMES_EN = ["Lily", "Tom", "Mia", "Ben", "Anna", "Sam"]
_THINGS_EN = ["a red ball", "a small dog", "a big box", "a green kite", "an old book", "a blue cup"]
_PLACES_EN = ["the park", "the garden", "the river", "the school", "the market", "the forest"]
_FEELINGS_EN = ["happy", "sad", "curious", "tired", "excited", "calm"]
_TEMPLATES_EN = [
    "{name} went to {place} and found {thing}.",
    "One day, {name} saw {thing} near {place}.",
    "{name} was {feeling} because {thing} was at {place}.",
    "At {place}, {name} played with {thing} all day.",
]

_NAMES_ZH = ["小明", "小红", "李华", "王芳", "张伟", "老师"]
_THINGS_ZH = ["一本书", "一只猫", "一朵花", "一把伞", "一杯茶", "一封信"]
_PLACES_ZH = ["公园", "学校", "图书馆", "河边", "市场", "山上"]
_FEELINGS_ZH = ["高兴", "难过", "好奇", "疲倦", "兴奋", "平静"]
_TEMPLATES_ZH = [
    "{name}去了{place}，看到了{thing}。",
    "有一天，{name}在{place}找到{thing}，觉得很{feeling}。",
    "{name}今天很{feeling}，因为{place}有{thing}。",
    "在{place}，{name}和朋友们一起读书、喝茶、聊天。",
]


def _sentences(templates, names, things, places, feelings, n: int, rng: random.Random) -> list[str]:
    return [
        rng.choice(templates).format(name=rng.choice(names), thing=rng.choice(things),
                                     place=rng.choice(places), feeling=rng.choice(feelings))
        for _ in range(n)
    ]


def english_documents(n: int = 400, seed: int = 0) -> list[str]:
    """`n` short English documents (2–4 sentences each)."""
    rng = random.Random(seed)
    return [" ".join(_sentences(_TEMPLATES_EN, _NAMES_EN, _THINGS_EN, _PLACES_EN, _FEELINGS_EN,
                                rng.randint(2, 4), rng)) for _ in range(n)]


def chinese_documents(n: int = 400, seed: int = 0) -> list[str]:
    """`n` short Chinese documents (2–4 sentences each)."""
    rng = random.Random(seed)
    return ["".join(_sentences(_TEMPLATES_ZH, _NAMES_ZH, _THINGS_ZH, _PLACES_ZH, _FEELINGS_ZH,
                               rng.randint(2, 4), rng)) for _ in range(n)]
