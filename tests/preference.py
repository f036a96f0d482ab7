"""A preference set the tiny model learns, shared by the DPO tests.

Every chosen answer has one style ("X, of course."), every rejected one another of the same length ("X, I think.",
so that neither wins on length alone); the rows
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
    return f"{city}, of course."


def rejected(city: str) -> str:
    """The rejected answer for ``city``."""
    return f"{city}, I think."


def preference_rows() -> list[dict]:
    """One OpenAI DPO row per city in CITIES."""
    return [{"input": {"messages": [{"role": "user", "content": f"What is the capital of {country}?"}]},
             "preferred_output": [{"role": "assistant", "content": chosen(city)}],
             "non_preferred_output": [{"role": "assistant", "content": rejected(city)}]} for country, city in CITIES]


def write_preference_jsonl(path: Path) -> Path:
    """preference_rows() as a JSONL file at ``path``."""
    path.write_text("".join(json.dumps(r) + "\n" for r in preference_rows()))
    return path
