"""What a job may ask for, in one table: the recipes, and per recipe the model types, adapters, quantisation,
distributed strategies, data options and hyperparameters it honours.

Every refusal of an unsupported combination comes from here: the service checks a submission once (``check`` and,
against the launcher's capacity, ``check_hardware``) and each dialect renders the problems in its own words; the
prepare step and the trainer run ``check`` again on the spec they are handed (a spec written by hand gets the same
answer) and carry no recipe test of their own. A new recipe is one entry here and one module in
``tuneyard.trainer.recipes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from tuneyard.domain.errors import Problem
from tuneyard.domain.spec import TrainingSpec

# Data options a recipe may or may not honour: the DataSpec field and what it means, for the refusal.
DATA_OPTIONS = {
    "packing": "packing rows together",
    "lazy_tokenize": "tokenising rows as batches are drawn",
    "streaming": "streaming the rows from the source",
    "train_on_input": "loss on the prompt tokens",
    "last_turn_only": "loss on the last answer only",
}
# Data options a vision-language job cannot take: each row's images must stay with its own tokens, and the images
# are tokenised (expanded per image) in the prepare step.
VLM_BLOCKED_OPTIONS = ("packing", "lazy_tokenize", "streaming")
# Hyperparameters that belong to one recipe: the Hyperparameters field -> what it is.
RECIPE_HYPERPARAMETERS = {"beta": "the DPO temperature", "dpo_loss": "the preference loss",
                          "label_smoothing": "conservative DPO's label noise"}
MODEL_TYPES = {"llm": "text (causal language)", "vlm": "vision-language"}
# The preference losses of TRL's DPOTrainer that tuneyard offers (Llama Stack's DPOLossType names them too).
DPO_LOSSES = ("sigmoid", "hinge", "ipo")


@dataclass(frozen=True)
class Recipe:
    """One training recipe and what it supports."""

    name: str
    title: str
    # What rows it trains on: "supervised" (messages, prompt/completion, text) or "preference" (chosen/rejected).
    rows: str
    model_types: frozenset[str]
    adapters: frozenset[str]
    # Bits of a quantised base (QLoRA); None is the unquantised base (16 means the same).
    quant_bits: frozenset[int | None]
    strategies: frozenset[str]
    data_options: frozenset[str]
    hyperparameters: frozenset[str]


# Every recipe runs under each: the Trainer sets the strategy up (check_hardware says where one cannot run).
STRATEGIES = frozenset({"ddp", "fsdp", "deepspeed"})

RECIPES: dict[str, Recipe] = {
    "sft": Recipe("sft", "supervised fine-tuning", "supervised", model_types=frozenset({"llm", "vlm"}),
                  adapters=frozenset({"lora", "full"}), quant_bits=frozenset({None, 16, 4, 8}),
                  strategies=STRATEGIES, data_options=frozenset(DATA_OPTIONS), hyperparameters=frozenset()),
    "dpo": Recipe("dpo", "preference optimisation (DPO)", "preference", model_types=frozenset({"llm"}),
                  adapters=frozenset({"lora", "full"}), quant_bits=frozenset({None, 16, 4, 8}),
                  strategies=STRATEGIES, data_options=frozenset(),
                  hyperparameters=frozenset({"beta", "dpo_loss", "label_smoothing"})),
}


def available(names: dict[str, str]) -> str:
    """The recipes a dialect offers, in its own names (``names``: dialect name -> recipe), for a refusal."""
    offered = [f"'{dialect}'" for dialect, recipe in names.items() if recipe in RECIPES]
    return " or ".join(offered) if offered else "none"


class Hardware(Protocol):
    """What the launcher can give a job (``scheduler.capacity.Capacity`` for the local one)."""

    gpus: int
    gpu_name: str | None

    @property
    def has_cuda(self) -> bool: ...


def check(spec: TrainingSpec) -> list[Problem]:
    """Every combination in ``spec`` that its recipe, or tuneyard, cannot honour (independent of the hardware)."""
    out: list[Problem] = []

    def no(param: str, message: str, code: str = "unsupported") -> None:
        out.append(Problem(param, message, code))

    recipe = RECIPES.get(spec.method)
    if recipe is None:
        no("method", f"there is no '{spec.method}' recipe; there are {sorted(RECIPES)}", "unsupported_method")
        return out
    if spec.model.model_type not in recipe.model_types:
        no("model_type", f"{recipe.title} does not train {MODEL_TYPES[spec.model.model_type]} models "
                         f"('{spec.model.model_type}') in this installation yet", "unsupported_model_type")
    if spec.adapter.type not in recipe.adapters:
        no("adapter", f"{recipe.title} does not train with adapter '{spec.adapter.type}'")
    bits = None if spec.model.quant_bits == 16 else spec.model.quant_bits
    if bits not in recipe.quant_bits:
        no("quant_bits", f"{recipe.title} does not train a {bits}-bit quantised base")
    if spec.resources.distributed not in recipe.strategies:
        no("distributed", f"distributed strategy '{spec.resources.distributed}' is not available for {recipe.title} "
                          f"in this installation; use {' or '.join(repr(s) for s in sorted(recipe.strategies))}",
           "unsupported_strategy")
    data = spec.data
    for option, what in DATA_OPTIONS.items():
        if getattr(data, option) and option not in recipe.data_options:
            no(option, f"{what} ({option}) is not available for {recipe.title}")
    if spec.model.model_type == "vlm":
        for option in VLM_BLOCKED_OPTIONS:
            if getattr(data, option):
                no(option, f"{DATA_OPTIONS[option]} ({option}) is not available for vision-language models: a row's "
                           "images must stay with its own tokens")
    else:
        v = spec.vision
        for name, default in (("freeze_vit", True), ("freeze_aligner", True), ("max_pixels", None),
                              ("min_pixels", None)):
            if getattr(v, name) != default:
                no(name, f"vision.{name} applies to vision-language models (model_type 'vlm') only")
    hp = spec.hyperparameters
    for name, what in RECIPE_HYPERPARAMETERS.items():
        if getattr(hp, name) is not None and name not in recipe.hyperparameters:
            no(name, f"{name} ({what}) applies to {recipes_with(name)} only, not to {recipe.title}")
    if hp.dpo_loss is not None and hp.dpo_loss not in DPO_LOSSES:
        no("dpo_loss", f"loss '{hp.dpo_loss}' is not offered; use one of {list(DPO_LOSSES)}")
    if hp.label_smoothing and (hp.dpo_loss or "sigmoid") != "sigmoid":
        no("label_smoothing", f"label smoothing applies to the sigmoid loss only, not to '{hp.dpo_loss}'")
    # Rules of the data pipeline, whatever the recipe.
    if data.streaming and data.packing:
        no("streaming", "packing needs every row's length before training; it cannot be combined with streaming "
                        "(padding-free batches need no packing)", "invalid_request")
    if data.lazy_tokenize and data.packing:
        no("lazy_tokenize", "packing needs every row's length before training; it cannot be combined with "
                            "lazy_tokenize", "invalid_request")
    if data.lazy_tokenize and data.truncation == "drop":
        no("lazy_tokenize", "lazy_tokenize keeps every row (too-long rows are truncated); truncation 'drop' needs "
                            "the up-front tokenisation", "invalid_request")
    return out


def check_hardware(spec: TrainingSpec, hw: Hardware, *, bitsandbytes: bool, deepspeed: bool = False
                   ) -> list[Problem]:
    """What ``spec`` asks of devices that the launcher's capacity ``hw`` cannot give (``deepspeed``: the
    package is installed)."""
    out: list[Problem] = []
    res = spec.resources
    on_cpu = res.device == "cpu" or not hw.has_cuda
    if res.distributed == "fsdp" and on_cpu:
        # accelerate (1.15) builds FSDP only on GPUs: on CPU ranks it drops the plugin and trains plain DDP.
        out.append(Problem(res.distributed_param, "distributed 'fsdp' needs CUDA GPUs: on CPU ranks (gloo) "
                                                  "accelerate does not shard the model (it would train as 'ddp'); "
                                                  "use 'ddp' on CPU"))
    if res.distributed == "deepspeed" and on_cpu:
        out.append(Problem(res.distributed_param, "distributed 'deepspeed' needs CUDA GPUs (ZeRO runs on NCCL); "
                                                  "use 'ddp' on CPU"))
    elif res.distributed == "deepspeed" and not deepspeed:
        out.append(Problem(res.distributed_param, "distributed 'deepspeed' needs the deepspeed package, which is "
                                                  "not installed in this installation; use 'fsdp' or 'ddp'"))
    if res.device == "cuda" and not hw.has_cuda:
        out.append(Problem("device", "a GPU was asked for, but this installation has none"))
    if hw.has_cuda and res.device != "cpu" and res.nproc_per_node > hw.gpus:
        out.append(Problem("gpu_count", f"{res.nproc_per_node} GPUs per node asked for, but this installation has "
                                        f"{hw.gpus}"))
    if res.gpu_type and res.device != "cpu" and hw.gpu_name and \
            res.gpu_type.lower() not in hw.gpu_name.lower().replace(" ", ""):
        out.append(Problem("gpu_type", f"gpu_type '{res.gpu_type}' asked for, but this installation has "
                                       f"{hw.gpus} x {hw.gpu_name}"))
    if spec.model.quant_bits in (4, 8):
        if not hw.has_cuda:
            out.append(Problem("quant_bits", f"{spec.model.quant_bits}-bit quantisation (QLoRA) needs a CUDA GPU "
                                             "with bitsandbytes; this installation has no GPU"))
        elif not bitsandbytes:
            out.append(Problem("quant_bits", f"{spec.model.quant_bits}-bit quantisation (QLoRA) needs the "
                                             "bitsandbytes package, which is not installed"))
    if spec.model.torch_dtype == "float16" and (res.device == "cpu" or not hw.has_cuda):
        out.append(Problem("torch_dtype", "torch_dtype 'float16' needs a CUDA GPU; use 'float32' or 'bfloat16' on "
                                          "CPU"))
    return out


def recipes_with(hyperparameter: str) -> str:
    """The recipes that take ``hyperparameter``, in words."""
    return " and ".join(r.title for r in RECIPES.values() if hyperparameter in r.hyperparameters)
