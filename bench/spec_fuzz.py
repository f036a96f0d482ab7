"""The API driven by documents nobody here wrote: OpenAI's own OpenAPI document and Llama Stack's 0.2.12 spec.

    python -m bench spec_fuzz                         # 400 examples per operation and mode, both documents
    python -m bench spec_fuzz --examples 50 --spec openai
    python -m bench spec_fuzz --show 3                # also print 3 sample failures of each kind

A real ``tuneyard serve`` (worker off; the tiny model under its local roots) is driven by schemathesis with
the trimmed copies in ``bench/specs/`` (``bench/trim_spec.py`` made them; their headers name the source
commits). Every operation of the document that tuneyard serves gets ``--examples`` generated requests that
the document calls valid ("positive") and as many it calls invalid ("negative"). In half of the positive
ones the ids the document cannot know are replaced by real ones (an uploaded training file, a created job,
the tiny model's path) so that the success paths, not only the 404s, are checked against the document.

Each response is put through schemathesis' checks: no 5xx, the response body, content type and headers as
the document describes them, invalid requests refused, authentication enforced, and (positive) valid
requests accepted. Every failure is then classified by ``bench/spec_noise.py``: known noise of the document
(each with its reason, mirrored in ``docs/spec-conformance.md``) or a finding. The summary prints requests
made, 5xx by operation, and failures by operation and check, findings and noise apart; the figures go to
``bench/results/spec_fuzz.json``. ``tests/api/test_spec_fuzz.py`` runs the same thing with a few examples.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.spec_noise import PENDING_PREFIX

REPO = Path(__file__).resolve().parent.parent
SPECS = REPO / "bench" / "specs"


@dataclass(frozen=True)
class Target:
    """One reference document and where its paths are served."""

    name: str
    document: Path
    prefix: str  # prepended to the document's paths: OpenAI's are relative to its server URL's /v1
    secured: bool  # whether the document declares the bearer key (schemathesis then generates the header)
    # Operations of the document that tuneyard does not serve (a 404 is right for them), with the reason.
    not_served: dict[str, str]


TARGETS = {
    "openai": Target("openai", SPECS / "openai-files-fine-tuning.yaml", "/v1", True, {
        "POST /fine_tuning/alpha/graders/run": "graders belong to reinforcement fine-tuning, which tuneyard refuses",
        "POST /fine_tuning/alpha/graders/validate": "as above",
        "GET /fine_tuning/checkpoints/{fine_tuned_model_checkpoint}/permissions":
            "sharing checkpoints with other OpenAI projects; tuneyard has organisations, not projects",
        "POST /fine_tuning/checkpoints/{fine_tuned_model_checkpoint}/permissions": "as above",
        "DELETE /fine_tuning/checkpoints/{fine_tuned_model_checkpoint}/permissions/{permission_id}": "as above",
    }),
    "llamastack": Target("llamastack", SPECS / "llama-stack-0.2.12-post-training-datasets.yaml", "", False, {
        "POST /v1/datasetio/append-rows/{dataset_id}": "datasetio (row reads and appends) is not served: tuneyard "
                                                       "reads a dataset's rows only to train on them",
        "GET /v1/datasetio/iterrows/{dataset_id}": "as above",
    }),
}


@dataclass
class Finding:
    """Failures of one kind: an operation, a check and schemathesis' title, with a few samples."""

    operation: str
    check: str
    title: str
    count: int = 0
    samples: list[str] = field(default_factory=list)
    noise: str | None = None  # why it is the document's, not ours (None: a finding)


@dataclass
class Report:
    """What a run saw."""

    requests: int = 0
    server_errors: Counter = field(default_factory=Counter)  # operation -> count
    kinds: dict[tuple[str, str, str, str | None], Finding] = field(default_factory=dict)
    refused_valid: Counter = field(default_factory=Counter)  # (operation, status, code) for positive requests
    refused_samples: dict[tuple[str, int, str | None], list[str]] = field(default_factory=dict)
    statuses: Counter = field(default_factory=Counter)  # (operation, status class "2xx"...)
    seconds: float = 0.0

    def add(self, operation: str, check: str, title: str, sample: str, noise: str | None) -> None:
        key = (operation, check, title, noise)
        f = self.kinds.setdefault(key, Finding(operation, check, title, noise=noise))
        f.count += 1
        if len(f.samples) < 5:
            f.samples.append(sample)

    def findings(self) -> list[Finding]:
        """The failures that are ours to fix, most frequent first."""
        return sorted((f for f in self.kinds.values() if f.noise is None), key=lambda f: -f.count)

    def pending(self) -> list[Finding]:
        """Findings that another branch fixes (``bench/spec_noise.py`` PENDING), most frequent first."""
        return sorted((f for f in self.kinds.values() if f.noise and f.noise.startswith(PENDING_PREFIX)),
                      key=lambda f: -f.count)

    def noise(self) -> list[Finding]:
        """The failures classified as the document's, most frequent first."""
        return sorted((f for f in self.kinds.values() if f.noise and not f.noise.startswith(PENDING_PREFIX)),
                      key=lambda f: -f.count)


class Seeds:
    """Real objects for the ids a generated request cannot know: made through the API, then (with the worker
    off) moved along in the store, as ``bench/api_load.py`` seeds it, so that every job state is served."""

    def __init__(self, base_url: str, headers: dict[str, str], model_path: str, training_jsonl: bytes,
                 db_url: str) -> None:
        import httpx

        from tuneyard.store.db import Store

        self.http = httpx.Client(base_url=base_url, headers=headers, timeout=60)
        self.store = Store(db_url)
        self.model_path = model_path
        self.training = training_jsonl
        self.requests = 0
        self._file: str | None = None
        self._jobs: dict[str, str] = {}
        self._dataset: str | None = None

    def new_file(self) -> str:
        """A freshly uploaded fine-tune file's id."""
        r = self.http.post("/v1/files", files={"file": ("train.jsonl", self.training)}, data={"purpose": "fine-tune"})
        self.requests += 1
        r.raise_for_status()
        return r.json()["id"]

    def file(self) -> str:
        """A fine-tune file that stays (never handed to a delete)."""
        self._file = self._file or self.new_file()
        return self._file

    def new_job(self, status: str = "validating_files") -> str:
        """A freshly created job, moved to ``status`` (queued, paused, succeeded, failed) in the store."""
        r = self.http.post("/v1/fine_tuning/jobs", json={"model": self.model_path, "training_file": self.file(),
                                                          "suffix": "fuzz", "metadata": {"seeded": status}})
        self.requests += 1
        r.raise_for_status()
        job_id = r.json()["id"]
        if status != "validating_files":
            self._stage(job_id, status)
        return job_id

    def _stage(self, job_id: str, status: str) -> None:
        import time

        from tuneyard.domain.jobs import JobStatus
        from tuneyard.ids import new_id
        from tuneyard.store.models import Checkpoint
        from tuneyard.store.repo import add_event, transition

        with self.store.session() as s:
            transition(s, job_id, JobStatus.QUEUED, resolved_hyperparameters={
                "n_epochs": 3, "batch_size": 1, "learning_rate_multiplier": 1.0, "learning_rate": 2e-4,
                "warmup_ratio": 0.0, "weight_decay": 0.0, "max_grad_norm": 1.0})
            if status == "queued":
                return
            if status == "paused":
                transition(s, job_id, JobStatus.PAUSED)
                return
            transition(s, job_id, JobStatus.RUNNING, trained_steps=3, total_steps=6, trained_tokens=300,
                       estimated_finish=time.time() + 60, started_at=time.time())
            add_event(s, job_id, "Step 3/6: training loss=1.5", type="metrics",
                      data={"step": 3, "total_steps": 6, "train_loss": 1.5, "train_mean_token_accuracy": 0.5})
            s.add(Checkpoint(id=new_id("ftckpt"), job_id=job_id, step=3, created_at=time.time(), path="",
                             metrics={"step": 3, "train_loss": 1.5, "train_mean_token_accuracy": 0.5}))
            if status == "failed":
                transition(s, job_id, JobStatus.FAILED, error={"code": "trainer_crashed", "message": "seeded failure",
                                                               "param": None})
            elif status == "succeeded":
                transition(s, job_id, JobStatus.SUCCEEDED, fine_tuned_model=f"{self.model_path}:fuzz:{job_id}",
                           result_files=[self.file()], trained_steps=6, estimated_finish=None)

    def job(self) -> str:
        """A job that stays (never handed to cancel, pause or resume); with one of each kind beside it."""
        if not self._jobs:
            for status in ("validating_files", "queued", "paused", "failed", "succeeded"):
                self._jobs[status] = self.new_job(status)
        return self._jobs["succeeded"]

    def dataset(self) -> str:
        """A registered Llama Stack dataset (rows inline) that stays."""
        if self._dataset is None:
            rows = [json.loads(line) for line in self.training.decode().splitlines() if line.strip()]
            r = self.http.post("/v1/datasets", json={"purpose": "post-training/messages",
                                                     "source": {"type": "rows", "rows": rows}})
            self.requests += 1
            r.raise_for_status()
            self._dataset = r.json()["identifier"]
        return self._dataset

    def close(self) -> None:
        self.http.close()
        self.store.dispose()


CREATE_JOB_FIELDS = {"model", "training_file", "validation_file", "hyperparameters", "suffix", "seed", "metadata",
                     "integrations", "method"}


def _substitute(case: Any, seeds: Seeds, target: str) -> None:
    """Put real ids (and a model and data that exist) into a positive case, in place."""
    method = case.operation.method.upper()
    mutating = method in ("DELETE", "POST")
    for name in list(case.path_parameters or {}):
        if name == "file_id":
            case.path_parameters[name] = seeds.new_file() if mutating else seeds.file()
        elif name == "fine_tuning_job_id" and mutating:
            # pause needs a queued (or running) job, resume a paused one, cancel any unfinished one.
            state = {"pause": "queued", "resume": "paused"}.get(case.operation.path.rsplit("/", 1)[-1], "queued")
            case.path_parameters[name] = seeds.new_job(state)
        elif name == "fine_tuning_job_id":
            case.path_parameters[name] = seeds.job()
        elif name == "dataset_id":
            case.path_parameters[name] = seeds.dataset()
    body = case.body
    if target == "openai" and isinstance(body, dict):
        if case.operation.path == "/fine_tuning/jobs":
            # Extra properties are allowed by the document and refused by tuneyard (and the live API): a
            # request meant to succeed leaves them out.
            for k in set(body) - CREATE_JOB_FIELDS:
                del body[k]
            body["model"] = seeds.model_path
            body["training_file"] = seeds.file()
            if "validation_file" in body:
                body["validation_file"] = seeds.file()
            if "suffix" in body:
                body["suffix"] = "fuzz"
        elif case.operation.path == "/files" and "file" in body:
            body["file"] = seeds.training
    if target == "llamastack":
        # tuneyard knows a job by the client's job_uuid or by its own id.
        if "job_uuid" in (case.query or {}):
            case.query["job_uuid"] = seeds.job()
        if isinstance(body, dict) and "job_uuid" in body and case.operation.path.endswith("/cancel"):
            body["job_uuid"] = seeds.new_job("queued")
        if isinstance(body, dict) and isinstance(body.get("model"), str):
            body["model"] = seeds.model_path


def _checks() -> list[Any]:
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        ignored_auth,
        negative_data_rejection,
        positive_data_acceptance,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    return [not_a_server_error, response_schema_conformance, content_type_conformance, response_headers_conformance,
            status_code_conformance, negative_data_rejection, positive_data_acceptance, ignored_auth]


def fuzz(target: Target, base_url: str, api_key: str, seeds: Seeds, examples: int, report: Report,
         deadline: float | None = None, modes: tuple[str, ...] = ("positive", "negative")) -> Report:
    """Drive every served operation of ``target`` with ``examples`` cases per mode; record into ``report``."""
    import schemathesis
    from hypothesis.errors import Unsatisfiable

    schema = schemathesis.openapi.from_path(str(target.document))
    headers = {"Authorization": f"Bearer {api_key}"}
    url = base_url + target.prefix
    checks = _checks()
    for result in schema.get_all_operations():
        op = result.ok()
        label = f"{op.method.upper()} {op.path}"
        if label in target.not_served:
            continue
        for mode in modes:
            if deadline is not None and time.time() > deadline:
                return report

            run = _test(op, label, mode, url, headers, checks, seeds, target, examples, report, deadline)
            # An operation with nothing to make invalid (no parameters, no body) has no negative cases.
            with contextlib.suppress(Unsatisfiable):
                run()
    return report


def _test(op: Any, label: str, mode: str, url: str, headers: dict[str, str], checks: list[Any], seeds: Seeds,
          target: Target, examples: int, report: Report, deadline: float | None) -> Any:
    """The hypothesis test that sends ``examples`` cases of ``op`` in ``mode`` and checks each response."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis.core.failures import FailureGroup

    from bench.spec_noise import classify

    secured = target.secured

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=schemathesis.GenerationMode(mode)), real=st.booleans())
    def run(case: Any, real: bool) -> None:
        if deadline is not None and time.time() > deadline:
            return
        if real and mode == "positive":
            _substitute(case, seeds, target.name)
        # Generated bearer credentials become the real key. A negative case that made them invalid (dropped,
        # or not "Bearer ...") keeps them: it must get a 401. Llama Stack's document declares no scheme.
        generated = {k.lower(): v for k, v in (case.headers or {}).items()}.get("authorization")
        sent = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
        if not secured or mode == "positive" or (generated or "").startswith("Bearer "):
            sent.update(headers)
        elif generated is not None:
            sent["Authorization"] = generated
        case.headers = sent
        response = case.call(base_url=url, timeout=60)
        report.requests += 1
        report.statuses[(label, f"{response.status_code // 100}xx")] += 1
        if response.status_code >= 500:
            report.server_errors[label] += 1
        if mode == "positive" and response.status_code >= 400:
            key = (label, response.status_code, _error_code(response))
            report.refused_valid[key] += 1
            kept = report.refused_samples.setdefault(key, [])
            if len(kept) < 5:
                kept.append(_sample(response, None))
        for check in checks:
            try:
                case.validate_response(response, checks=[check], headers=sent,
                                       transport_kwargs={"base_url": url})
            except FailureGroup as group:
                for failure in group.exceptions:
                    report.add(label, check.__name__, failure.title, _sample(response, failure),
                               classify(target.name, label, check.__name__, failure, case, response))

    return run


def _error_code(response: Any) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body["error"].get("code") or body["error"].get("type")
    if isinstance(body, dict) and isinstance(body.get("detail"), dict | str):
        return str(body.get("title") or "detail")[:40]
    return None


def _sample(response: Any, failure: Any) -> str:
    req = response.request
    body = req.body if isinstance(req.body, str | None) else req.body[:300].decode("utf-8", "replace")
    message = " ".join(str(failure.message).split())[:400] if failure is not None else ""
    return (f"{req.method} {req.url} body={str(body)[:300]!s} -> {response.status_code} "
            f"{response.text[:300]!s} | {message}")


def start_server(work: Path) -> tuple[Any, str, str, bytes]:
    """A tuneyard server (worker off) with the tiny model under its local roots: (server, key, model, data)."""
    from bench.api_load import _Server
    from tuneyard.demo.tiny import build_tiny_model, write_sample_jsonl

    model = build_tiny_model(work / "models" / "tiny-llama")
    data = write_sample_jsonl(work / "train.jsonl").read_bytes()
    server = _Server(work / "home", {"TUNEYARD_RUN_WORKER": "false", "TUNEYARD_LOCAL_ROOTS": str(work / "models"),
                                     "TUNEYARD_MAX_UPLOAD_BYTES": "1000000"})
    return server, server.key("spec-fuzz"), str(model), data


def run(targets: list[str], examples: int, minutes: float) -> Report:
    """Start a server, fuzz each named target against it, stop it; the report."""
    report = Report()
    t0 = time.time()
    deadline = t0 + minutes * 60
    with tempfile.TemporaryDirectory(prefix="tuneyard-spec-fuzz-") as tmp:
        (Path(tmp) / "home").mkdir()
        server, key, model, data = start_server(Path(tmp))
        try:
            seeds = Seeds(server.url, {"Authorization": f"Bearer {key}"}, model, data,
                          f"sqlite:///{Path(tmp) / 'home' / 'tuneyard.db'}")
            for name in targets:
                fuzz(TARGETS[name], server.url, key, seeds, examples, report, deadline)
            report.requests += seeds.requests
            seeds.close()
        finally:
            server.stop()
    report.seconds = time.time() - t0
    return report


def print_report(report: Report, show: int) -> None:
    """The summary tables: 5xx by operation, findings and noise by operation and check."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    console.print(f"{report.requests} requests in {report.seconds / 60:.1f} minutes; "
                  f"{sum(report.server_errors.values())} answered with a 5xx")
    for title, kinds in (("findings (ours)", report.findings()), ("findings fixed in other branches", report.pending()),
                         ("noise (the document's)", report.noise())):
        table = Table(title=title)
        for col in ("operation", "check", "failure", "count") + (("why",) if kinds and kinds[0].noise else ()):
            table.add_column(col)
        for f in kinds:
            table.add_row(f.operation, f.check, f.title, str(f.count), *((f.noise,) if f.noise else ()))
        console.print(table)
        for f in kinds[:50] if show else []:
            console.print(f"[bold]{f.operation} {f.check}: {f.title}[/bold]")
            for s in f.samples[:show]:
                console.print("   ", s, markup=False, highlight=False)
    table = Table(title="valid requests (positive) refused: operation, status, error code")
    for col in ("operation", "status", "code", "count"):
        table.add_column(col)
    for (op, status, code), n in sorted(report.refused_valid.items(), key=lambda kv: -kv[1]):
        table.add_row(op, str(status), str(code), str(n))
    console.print(table)
    if show:
        for samples in report.refused_samples.values():
            for sample in samples[:show]:
                console.print("   ", sample, markup=False, highlight=False)
    table = Table(title="responses by operation")
    for col in ("operation", "2xx", "4xx", "5xx"):
        table.add_column(col)
    for op in sorted({op for op, _ in report.statuses}):
        table.add_row(op, *(str(report.statuses[(op, c)]) for c in ("2xx", "4xx", "5xx")))
    console.print(table)


def bench(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the fuzz; print and write bench/results/spec_fuzz.json."""
    from bench.common import print_table, write_result

    ap = argparse.ArgumentParser(prog="python -m bench spec_fuzz")
    ap.add_argument("--examples", type=int, default=400, help="generated examples per operation and mode")
    ap.add_argument("--spec", choices=[*TARGETS, "all"], default="all")
    ap.add_argument("--minutes", type=float, default=60, help="stop generating after this long")
    ap.add_argument("--show", type=int, default=0, help="sample failures to print of each kind")
    args = ap.parse_args(argv or [])
    report = run(list(TARGETS) if args.spec == "all" else [args.spec], args.examples, args.minutes)
    print_report(report, args.show)
    findings = report.findings()
    figures = {"examples_per_operation": args.examples, "requests": report.requests,
               "server_errors": sum(report.server_errors.values()),
               "findings": sum(f.count for f in findings), "finding_kinds": len(findings),
               "pending_elsewhere": sum(f.count for f in report.pending()),
               "noise": sum(f.count for f in report.noise()), "minutes": round(report.seconds / 60, 1)}
    targets = {"server_errors": "0", "findings": "0"}
    notes = {"findings": [f.__dict__ for f in findings], "pending_elsewhere": [f.__dict__ for f in report.pending()],
             "noise": [f.__dict__ for f in report.noise()],
             "server_errors_by_operation": dict(report.server_errors),
             "refused_valid": [{"operation": op, "status": st, "code": code, "count": n,
                                "samples": report.refused_samples.get((op, st, code), [])}
                               for (op, st, code), n in report.refused_valid.most_common()]}
    write_result("spec_fuzz", figures, targets, notes)
    print_table("spec_fuzz", [(k, v, targets.get(k)) for k, v in figures.items()])
    return {"figures": figures, "targets": targets}


if __name__ == "__main__":
    bench(sys.argv[1:])
