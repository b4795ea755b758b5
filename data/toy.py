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


# The demo's small world of facts: who likes to go where and what each one has. The
# Chinese corpus states them, and instruction data asks about them, so that after
# instruction tuning the toy model can answer questions its own data answers.
FACTS_ZH = {"小明": ("公园", "一只猫"), "小红": ("图书馆", "一本书"), "李华": ("河边", "一把伞"),
            "王芳": ("市场", "一朵花"), "张伟": ("山上", "一杯茶"), "老师": ("学校", "一封信")}


def fact_documents() -> list[str]:
    """One document per person, stating their facts in two ways."""
    return [f"{name}最喜欢去{place}。{name}有{thing}。{place}是{name}最喜欢去的地方。"
            for name, (place, thing) in FACTS_ZH.items()]


def fact_questions() -> list[tuple[str, str]]:
    """(question, answer) pairs about every fact, in three phrasings."""
    pairs = []
    for name, (place, thing) in FACTS_ZH.items():
        pairs += [(f"{name}最喜欢去哪里？", f"{name}最喜欢去{place}。"),
                  (f"{name}有什么？", f"{name}有{thing}。"),
                  (f"谁最喜欢去{place}？", f"{name}最喜欢去{place}。")]
    return pairs
