"""A preference set the tiny model learns, shared by the DPO tests.

Every chosen answer has one style ("Sure! The answer is X."), every rejected one another (a bare "X"); the rows
are OpenAI's DPO form (``input.messages``, ``preferred_output``, ``non_preferred_output``). 12 rows: at batch 4,
3 steps an epoch (as the SFT sample set at the same batch).
"""

from __future__ import annotations

import json
from pathlib import Path

CITIES = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Egypt", "Cairo"),
          ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Chile", "Santiago"), ("Cuba", "Havana"), ("Iran", "Tehran"),
          ("Iraq", "Baghdad"), ("Mali", "Bamako")]
HELD_OUT = [("Norway", "Oslo"), ("Greece", "Athens"), ("Poland", "Warsaw")]


def chosen(city: str) -> str:
    """The preferred answer for ``city``."""
    return f"Sure! The answer is {city}."


def preference_rows() -> list[dict]:
    """One OpenAI DPO row per city in CITIES."""
    return [{"input": {"messages": [{"role": "user", "content": f"What is the capital of {country}?"}]},
             "preferred_output": [{"role": "assistant", "content": chosen(city)}],
             "non_preferred_output": [{"role": "assistant", "content": city}]} for country, city in CITIES]


def write_preference_jsonl(path: Path) -> Path:
    """preference_rows() as a JSONL file at ``path``."""
    path.write_text("".join(json.dumps(r) + "\n" for r in preference_rows()))
    return path
