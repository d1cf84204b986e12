"""Writes demo.jsonl and demo-eval.jsonl: short question/answer facts a tiny model can learn.

    python deployments/data/make_demo.py       # deterministic: the same bytes every time

Each answer repeats words of its question in a fixed template ("The capital of Peru is Lima."),
so even a 64-dim seed model learns the pattern and its held-out loss drops clearly. The held-out
file holds other examples of the same templates (a shuffled split, 60 examples).

demo-bench.jsonl turns the held-out examples whose answer ends in a word of a known set (a color, a
home, a city, a country, a number) into a small benchmark for lm-evaluation-harness
(deployments/tasks/): `query` with four `choices` (the answer and three with another word of
the same set; `gold` is the answer's index) for multiple choice, and `context`/`continuation`
(the answer's last word cut off) for a cloze. The yes/no examples have no such word and stay out.
"""
import json
import os
import random

COLORS = ["red", "blue", "green", "yellow", "white", "black", "orange", "purple", "brown", "gray"]
THINGS = ["apple", "car", "house", "door", "cup", "book", "chair", "ball", "kite", "boat", "shirt", "lamp",
          "box", "flag", "hat", "bag", "pen", "bike", "shoe", "vase", "rug", "bell", "coat", "tent"]
ANIMALS = {"fish": "sea", "camel": "desert", "monkey": "forest", "frog": "pond", "owl": "forest", "whale": "ocean",
           "goat": "mountains", "bee": "hive", "cow": "field", "duck": "lake", "fox": "woods", "crab": "beach",
           "bear": "forest", "lion": "savanna", "seal": "ice", "horse": "stable", "rabbit": "meadow", "eagle": "sky"}
CAPITALS = {"France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Peru": "Lima", "Japan": "Tokyo",
            "Egypt": "Cairo", "Kenya": "Nairobi", "Chile": "Santiago", "Norway": "Oslo", "Poland": "Warsaw",
            "Greece": "Athens", "Cuba": "Havana", "Iran": "Tehran", "Nepal": "Kathmandu", "Ghana": "Accra",
            "Sweden": "Stockholm", "Austria": "Vienna", "Ireland": "Dublin", "Portugal": "Lisbon", "Mali": "Bamako"}
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]


def examples(rng: random.Random):
    out = []
    for thing in THINGS:
        for color in rng.sample(COLORS, 8):
            out.append((f"What color is the {color} {thing}?", f"The {color} {thing} is {color}."))
    for animal, home in ANIMALS.items():
        out.append((f"Where does the {animal} live?", f"The {animal} lives in the {home}."))
        out.append((f"Is the {animal} an animal?", f"Yes, the {animal} is an animal."))
    for country, city in CAPITALS.items():
        out.append((f"What is the capital of {country}?", f"The capital of {country} is {city}."))
        out.append((f"Which country has {city} as its capital?", f"{city} is the capital of {country}."))
    for i in range(len(NUMBERS) - 1):
        out.append((f"What number comes after {NUMBERS[i]}?", f"After {NUMBERS[i]} comes {NUMBERS[i + 1]}."))
    return out


def pools():
    return [COLORS, sorted(set(ANIMALS.values())), list(CAPITALS.values()), list(CAPITALS), NUMBERS]


def bench_row(prompt: str, response: str, rng: random.Random) -> dict | None:
    """A multiple-choice and cloze item from one held-out example, or None (no known last word)."""
    head, _, last = response.rstrip(".").rpartition(" ")
    pool = next((p for p in pools() if last in p), None)
    if pool is None:
        return None
    wrong = rng.sample([w for w in pool if w != last], 3)
    choices = [f"{head} {w}." for w in [last, *wrong]]
    rng.shuffle(choices)
    return {"query": prompt, "choices": [c.lstrip() for c in choices], "gold": choices.index(f"{head} {last}."),
            "context": prompt + head, "continuation": f" {last}"}


def bench(held_out, rng: random.Random) -> list[dict]:
    rows = (bench_row(f"Q: {q}\nA:", f" {a}", rng) for q, a in held_out)
    return [r for r in rows if r is not None]


def main():
    rng = random.Random(0)
    rows = examples(rng)
    rng.shuffle(rows)
    n_eval = 60
    here = os.path.dirname(os.path.abspath(__file__))
    for name, part in (("demo-eval.jsonl", rows[:n_eval]), ("demo.jsonl", rows[n_eval:])):
        with open(os.path.join(here, name), "w") as f:
            for q, a in part:
                f.write(json.dumps({"prompt": f"Q: {q}\nA:", "response": f" {a}"}) + "\n")
    # Its own generator: the split above stays byte for byte what it was.
    with open(os.path.join(here, "demo-bench.jsonl"), "w") as f:
        for row in bench(rows[:n_eval], random.Random(1)):
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
