"""The offline demo stream: three instruction tasks generated here, deterministically, over the *same*
kind of sentence. Each task asks a different question about it and answers with the same made-up code
words, so a model cannot know the mapping zero-shot (chance level), can learn each rule from a few dozen
examples, and a model trained on the tasks one after another tends to overwrite the earlier mappings:
forgetting is visible within minutes on a CPU."""

from __future__ import annotations

import random

from evolora.data.tasks import Example, Task

CODE_WORDS = ["ko", "ra", "mi", "tu"]

OBJECTS = {
    "fruit": ["apple", "banana", "mango", "cherry", "grape", "pear", "lemon", "peach", "plum", "melon"],
    "animal": ["dog", "horse", "tiger", "rabbit", "goat", "mouse", "lion", "sheep", "fox", "bear"],
    "vehicle": ["truck", "bus", "bicycle", "car", "tractor", "van", "scooter", "train", "taxi", "boat"],
    "tool": ["hammer", "wrench", "saw", "drill", "shovel", "chisel", "rake", "axe", "spanner", "pliers"],
}
PLACES = {
    "water": ["river", "harbor", "lake", "beach", "pond", "canal", "coast", "bay"],
    "building": ["school", "station", "office", "library", "museum", "hospital", "bakery", "church"],
    "open land": ["farm", "field", "meadow", "desert", "valley", "prairie", "hill", "orchard"],
}
CASES = {"lower": str.lower, "upper": str.upper, "title": str.title}

TASKS = {
    "demo_object": ("Which kind of thing does the sentence mention? Choose one from the option.\n",
                    list(OBJECTS)),
    "demo_place": ("What kind of place does the sentence name? Choose one from the option.\n", list(PLACES)),
    "demo_case": ("How is the sentence written: lower case, upper case or title case? "
                  "Choose one from the option.\n", list(CASES)),
}
# Each task maps its classes to the code words in its own order, so the tasks conflict.
LABEL_OF = {
    "demo_object": dict(zip(OBJECTS, ["ko", "ra", "mi", "tu"])),
    "demo_place": dict(zip(PLACES, ["mi", "ko", "tu"])),
    "demo_case": dict(zip(CASES, ["ra", "tu", "ko"])),
}


def _sentence(rng: random.Random) -> tuple[str, dict[str, str]]:
    kind = rng.choice(list(OBJECTS))
    place = rng.choice(list(PLACES))
    case = rng.choice(list(CASES))
    text = f"we counted {rng.randint(2, 999)} {rng.choice(OBJECTS[kind])} items near the {rng.choice(PLACES[place])}."
    return CASES[case](text), {"demo_object": kind, "demo_place": place, "demo_case": case}


def _balanced(name: str, per_label: int, rng: random.Random, seen: set[str]) -> list[Example]:
    want = {label: per_label for label in LABEL_OF[name].values()}
    out: list[Example] = []
    while any(want.values()):
        text, classes = _sentence(rng)
        label = LABEL_OF[name][classes[name]]
        if want[label] and text not in seen:
            seen.add(text)
            want[label] -= 1
            out.append(Example(text, label))
    return out


def demo_tasks(seed: int = 0, train_per_label: int = 40, test_per_label: int = 15) -> list[Task]:
    tasks = []
    for index, (name, (instruction, _classes)) in enumerate(TASKS.items()):
        rng = random.Random(f"evolora-demo:{seed}:{index}")
        seen: set[str] = set()
        test = _balanced(name, test_per_label, rng, seen)
        train = _balanced(name, train_per_label, rng, seen)
        labels = sorted(set(LABEL_OF[name].values()), key=CODE_WORDS.index)
        tasks.append(Task(name, instruction, labels, train, test))
    return tasks
