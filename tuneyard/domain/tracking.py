"""Experiment trackers a job may report to, and what each one's settings hold.

Every dialect translates its own words into ``IntegrationSpec(type, config, param)`` (OpenAI's ``integrations``,
Llama Stack's ``logger_config``, Simplismart's ``train_config.integrations``); ``check`` is the one place that says
whether a tracker's settings are complete and honoured. TensorBoard event files are written for every job anyway,
so asking for ``tensorboard`` is accepted (and changes nothing). The trainer (``tuneyard.trainer.tracking``) turns
the checked configs into transformers' own callbacks.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tuneyard.domain.errors import Problem
from tuneyard.domain.spec import IntegrationSpec

Name = Annotated[str, Field(min_length=1, max_length=256)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WandbConfig(_Strict):
    """OpenAI's ``integrations[].wandb``; the run id is always the job id, so a resumed job continues its run."""

    project: Name
    name: Name | None = None
    entity: Name | None = None
    tags: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(None, max_length=64)
    # A stored 'wandb' secret of the organisation; None: the organisation's one 'wandb' secret.
    secret_id: Name | None = None


class MlflowConfig(_Strict):
    """A tuneyard extension: an MLflow tracking server (http or https), the experiment and the run's name."""

    tracking_uri: Annotated[str, Field(min_length=1, max_length=2048)]
    experiment: Name | None = None
    run_name: Name | None = None


class TensorboardConfig(_Strict):
    """Nothing to set: every job's output holds its TensorBoard event files."""


CONFIGS: dict[str, type[_Strict]] = {"wandb": WandbConfig, "mlflow": MlflowConfig, "tensorboard": TensorboardConfig}


def parse(integration: IntegrationSpec) -> _Strict:
    """The typed config of a checked integration."""
    return CONFIGS[integration.type].model_validate(integration.config)


def check(integrations: list[IntegrationSpec]) -> list[Problem]:
    """Every problem with the trackers asked for (unknown type, bad or missing settings, one tracker twice)."""
    problems: list[Problem] = []
    seen: set[str] = set()
    for i in integrations:
        if i.type not in CONFIGS:
            problems.append(Problem(i.param, f"{i.param}: tracker '{i.type}' is not available; this installation "
                                             f"reports to {', '.join(CONFIGS)}", "unsupported_integration"))
            continue
        if i.type in seen:
            problems.append(Problem(i.param, f"{i.param}: '{i.type}' is given more than once; a job reports to one "
                                             "run per tracker", "duplicate_integration"))
        seen.add(i.type)
        try:
            cfg = parse(i)
        except ValidationError as e:
            for err in e.errors():
                where = ".".join(str(p) for p in err["loc"])
                problems.append(Problem(i.param, f"{i.param}: {i.type}.{where}: {err['msg']}", "invalid_integration"))
            continue
        if isinstance(cfg, MlflowConfig):
            parts = urlsplit(cfg.tracking_uri)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                problems.append(Problem(i.param, f"{i.param}: mlflow.tracking_uri must be an http:// or https:// "
                                                 "URL of an MLflow tracking server", "invalid_integration"))
            elif parts.username or parts.password:
                problems.append(Problem(i.param, f"{i.param}: mlflow.tracking_uri must not hold credentials",
                                        "invalid_integration"))
    return problems
