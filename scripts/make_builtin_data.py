"""Regenerate the built-in `json_extract` dataset, deterministically.

    python scripts/make_builtin_data.py

Each row asks the model to pull five fields out of an order sentence and answer with one line of
compact JSON, keys in a fixed order. SmolLM2-135M-Instruct answers in prose or loose JSON (0-10%
exact), and a few minutes of LoRA teach it the format and the copying (90%+ exact): a task whose
before/after difference a user can see. Validation sentences never appear in training.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 20261124
N_TRAIN, N_VALIDATION = 800, 60
OUT = Path(__file__).resolve().parents[1] / "src" / "tunewise" / "builtin" / "json_extract"

NAMES = [
    "Maria",
    "Ahmed",
    "Chen",
    "Olivia",
    "Lucas",
    "Priya",
    "Tomas",
    "Fatima",
    "Kenji",
    "Sofia",
    "Liam",
    "Amara",
    "Noah",
    "Elena",
    "Mateo",
    "Aisha",
    "Hugo",
    "Ingrid",
    "Ravi",
    "Chloe",
    "Diego",
    "Hana",
    "Oscar",
    "Leila",
    "Felix",
    "Nadia",
    "Yusuf",
    "Greta",
    "Arjun",
    "Mei",
    "Pablo",
    "Zara",
    "Ivan",
    "Lena",
    "Omar",
    "Rosa",
    "Kofi",
    "Alba",
    "Sven",
    "Tara",
]
CITIES = [
    "Paris",
    "Lagos",
    "Lima",
    "Oslo",
    "Kyoto",
    "Quito",
    "Cairo",
    "Dublin",
    "Porto",
    "Accra",
    "Hanoi",
    "Dakar",
    "Riga",
    "Perth",
    "Delhi",
    "Tunis",
    "Seoul",
    "Milan",
    "Turin",
    "Bergen",
    "Nairobi",
    "Lisbon",
    "Vienna",
    "Prague",
    "Madrid",
    "Denver",
    "Austin",
    "Boston",
    "Sydney",
    "Zurich",
]
ITEMS = [
    "apples",
    "lamps",
    "chairs",
    "notebooks",
    "bicycles",
    "candles",
    "mugs",
    "pencils",
    "blankets",
    "kettles",
    "umbrellas",
    "helmets",
    "scarves",
    "batteries",
    "lanterns",
    "baskets",
    "teapots",
    "mirrors",
    "cushions",
    "backpacks",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
TEMPLATES = [
    "{name} from {city} ordered {quantity} {item} on {day}.",
    "On {day}, {name} bought {quantity} {item} in {city}.",
    "{quantity} {item} were shipped to {name} in {city} on {day}.",
    "{name} ({city}) placed an order for {quantity} {item} last {day}.",
    "Please send {quantity} {item} to {name}, {city}, by {day}.",
    "It was {day} when {name} picked up {quantity} {item} in {city}.",
]
INSTRUCTION = "Extract name, city, item, quantity and day as JSON."


def make_row(rng: random.Random) -> tuple[str, dict]:
    fields = {
        "name": rng.choice(NAMES),
        "city": rng.choice(CITIES),
        "item": rng.choice(ITEMS),
        "quantity": rng.randint(2, 99),
        "day": rng.choice(DAYS),
    }
    return rng.choice(TEMPLATES).format(**fields), fields


def to_row(sentence: str, fields: dict) -> dict:
    answer = json.dumps(fields, separators=(", ", ": "))
    return {"instruction": INSTRUCTION, "input": sentence, "output": answer}


def main() -> None:
    rng = random.Random(SEED)
    seen: set[str] = set()
    rows: list[dict] = []
    while len(rows) < N_TRAIN + N_VALIDATION:
        sentence, fields = make_row(rng)
        if sentence not in seen:  # every sentence unique, so validation never leaks into training
            seen.add(sentence)
            rows.append(to_row(sentence, fields))
    OUT.mkdir(parents=True, exist_ok=True)
    for name, part in (("validation", rows[:N_VALIDATION]), ("train", rows[N_VALIDATION:])):
        with open(OUT / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in part)
        print(f"wrote {len(part)} rows to {OUT / name}.jsonl")


if __name__ == "__main__":
    main()
