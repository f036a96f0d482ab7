"""The trainer's recipes, by ``spec.method``: one module each, built over ``tuneyard.trainer.plumbing``.

A recipe module defines ``load_datasets(ctx)``, ``train_rows(ctx, dataset)`` and
``build_trainer(ctx, model, train, valid, callbacks)``; what each recipe supports (model types, adapters,
quantisation, strategies, devices, data options) is ``tuneyard.domain.capabilities``, checked by the service at
submission and again here. A new recipe is a module and one line below (and one in the capabilities table).
"""

from __future__ import annotations

import importlib
from types import ModuleType

RECIPES: dict[str, str] = {
    "sft": "tuneyard.trainer.recipes.sft",
    "dpo": "tuneyard.trainer.recipes.dpo",
}


def load(method: str) -> ModuleType:
    """The recipe module for ``method``; KeyError names the recipes there are."""
    try:
        return importlib.import_module(RECIPES[method])
    except KeyError:
        raise KeyError(f"no recipe '{method}'; there are {sorted(RECIPES)}") from None
