"""The one metric vocabulary: the name each training metric has in events, checkpoints and results, what it
means, and the Trainer log key it comes from. The trainer reports under these names; each dialect translates
from them (``METRICS`` by name), so a recipe's new metric reaches every dialect by one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    """One metric: its name, the key in the Trainer's logs, when it is logged, and what it means."""

    name: str
    log_key: str
    phase: str  # "train": each logging step; "valid": each evaluation
    meaning: str
    # Kept as the job's latest value (checkpoint and final metrics), not only in its step's event.
    latest: bool = True


_ALL = (
    Metric("train_loss", "loss", "train", "the training loss of the step (recipe's loss: cross-entropy for SFT, "
                                          "the preference loss for DPO)"),
    Metric("train_mean_token_accuracy", "mean_token_accuracy", "train",
           "share of target tokens the model predicts right (argmax)"),
    Metric("learning_rate", "learning_rate", "train", "the learning rate of the step", latest=False),
    Metric("grad_norm", "grad_norm", "train", "the gradient norm before clipping", latest=False),
    Metric("rewards_chosen", "rewards/chosen", "train",
           "DPO: beta x (policy - reference) log-probability of the chosen answers, mean"),
    Metric("rewards_rejected", "rewards/rejected", "train",
           "DPO: the same for the rejected answers"),
    Metric("rewards_margins", "rewards/margins", "train", "DPO: chosen minus rejected reward, mean"),
    Metric("rewards_accuracies", "rewards/accuracies", "train",
           "DPO: share of pairs whose chosen reward is above the rejected one"),
    Metric("valid_loss", "eval_loss", "valid", "the loss on the validation set"),
    Metric("valid_mean_token_accuracy", "eval_mean_token_accuracy", "valid",
           "token accuracy on the validation set"),
    Metric("valid_rewards_chosen", "eval_rewards/chosen", "valid", "DPO: rewards_chosen on the validation set"),
    Metric("valid_rewards_rejected", "eval_rewards/rejected", "valid", "DPO: rewards_rejected on the validation set"),
    Metric("valid_rewards_margins", "eval_rewards/margins", "valid", "DPO: rewards_margins on the validation set"),
    Metric("valid_rewards_accuracies", "eval_rewards/accuracies", "valid",
           "DPO: rewards_accuracies on the validation set"),
)
METRICS: dict[str, Metric] = {m.name: m for m in _ALL}
TRAIN = tuple(m for m in _ALL if m.phase == "train")
VALID = tuple(m for m in _ALL if m.phase == "valid")
# The preference metrics, for the dialects that list them beside the loss.
REWARDS = tuple(m.name for m in _ALL if "rewards" in m.name)


def from_logs(logs: dict[str, float], phase: str) -> dict[str, float]:
    """The metrics of one Trainer log dict of ``phase``, under their names (absent ones left out)."""
    return {m.name: float(logs[m.log_key]) for m in (TRAIN if phase == "train" else VALID)
            if isinstance(logs.get(m.log_key), int | float)}
