"""The prepare step of a job: ``python -m tuneyard.data.prepare JOBDIR``.

Reads ``spec.json``, checks that the model's config and tokenizer load, validates the data files,
tokenises them (streaming, in a process per core for a big file: see ``pipeline.py``) into ``data/train`` and
``data/validation`` (Arrow files, columns ``input_ids`` and ``labels``: see ``splits.py``), resolves the
"auto" hyperparameters from the number of training examples into ``resolved_spec.json`` and finally
writes ``prepared.json`` (atomically, last, so that its presence means the step finished): a
``tuneyard.jobdir.PreparedOk`` (counts, tokens, total steps, format, template, resolved hyperparameters) or a
``PreparedFailed`` (``error``: code, message, param).

The training file, the validation file and the model are tried independently: when several fail, the error is
the first one's code and param, its message listing them all. Error codes: ``invalid_training_file``,
``invalid_validation_file``, ``invalid_n_examples``, ``model_not_found``, ``invalid_request`` (a setting that
cannot work, e.g. an unknown template) and ``internal_error`` (a bug: exit status 1). A failure the caller can
fix exits 0: the step did its job.
Nothing from the environment or the spec's integrations is ever printed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tuneyard.data.cache import TokenisedCache, cache_key, file_digest, tokenizer_digest
from tuneyard.data.formats import normalize_format_name
from tuneyard.data.pipeline import split_positions
from tuneyard.data.templates import resolve_template, template_label
from tuneyard.data.tokenize import EncodeStats
from tuneyard.data.validate import CODE_N_EXAMPLES, ValidationReport, iter_examples, validate_file
from tuneyard.domain import capabilities
from tuneyard.domain.errors import Problem, TuneyardError, combined_message
from tuneyard.domain.hparams import resolve, total_steps
from tuneyard.domain.spec import DataSource, RuntimeSpec, TrainingSpec
from tuneyard.jobdir import EventWriter, JobDir, JobError, PreparedFailed, PreparedOk, write_json_atomic

INTERNAL_ERROR = "internal_error"


class PrepareFailure(Exception):
    """A failure the caller can act on; becomes a ``PreparedFailed`` ``prepared.json``."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param

    def to_error(self) -> JobError:
        """The failure as ``prepared.json`` carries it."""
        return JobError(code=self.code, message=self.message, param=self.param)

    @classmethod
    def combine(cls, failures: list[PrepareFailure]) -> PrepareFailure:
        """One failure reporting all of ``failures``: the first one's code and param, every message."""
        if len(failures) == 1:
            return failures[0]
        message = combined_message([Problem(f.param, f.message, f.code) for f in failures])
        return cls(failures[0].code, message, failures[0].param)


class _Failures:
    """The failures of independent steps (the data, the model), so that one does not hide another."""

    def __init__(self) -> None:
        self.found: list[PrepareFailure] = []

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        try:
            yield
        except PrepareFailure as f:
            self.found.append(f)

    def raise_if_any(self) -> None:
        if self.found:
            raise PrepareFailure.combine(self.found)


class _Log:
    """Events for the scheduler, echoed to stdout for the job's log file."""

    def __init__(self, events: EventWriter | None) -> None:
        self.events = events

    def __call__(self, message: str, level: str = "info", **data: Any) -> None:
        print(f"[prepare] {level}: {message}", flush=True)
        if self.events is not None:
            self.events.emit("message", message, data or None, level=level)


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_tokenizer(spec: TrainingSpec) -> tuple[Any, Any]:
    """The model's (config, tokenizer); PrepareFailure ``model_not_found`` when either does not load."""
    from transformers import AutoConfig, AutoTokenizer

    m = spec.model
    try:
        config = AutoConfig.from_pretrained(m.name, revision=m.revision,
                                            trust_remote_code=m.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(m.name, revision=m.revision,
                                                  trust_remote_code=m.trust_remote_code)
    except Exception as e:  # OSError, ValueError, EnvironmentError, ImportError from remote code...
        raise PrepareFailure("model_not_found", f"model '{m.name}' could not be loaded: {_first_line(e)}",
                             "model") from e
    return config, tokenizer


def _image_base(given: DataSource) -> str | None:
    """Where the relative image paths of a source start: beside the file (or URL) the caller named; an upload
    has no such place."""
    from tuneyard.data.images import base_of
    from tuneyard.data.sources import hub_local_dir, kind_of

    if given.file_id is not None or kind_of(given.path) == "hf" and hub_local_dir(given.path) is None:
        return None
    local = hub_local_dir(given.path) or given.path
    return local if kind_of(local) is None and Path(local).is_dir() else base_of(local)


def _validate(source: DataSource, *, validation: bool, min_examples: int, max_errors: int,
              log: _Log, runtime: RuntimeSpec, method: str = "sft", given: DataSource | None = None
              ) -> ValidationReport:
    from tuneyard.data.images import ImageRules

    label = "Validation file" if validation else "Training file"
    log(f"Validating {label.lower()}")
    report = validate_file(source.path, source.format, source.container, max_errors=max_errors,
                           min_examples=min_examples, label=label, method=method,
                           images=ImageRules.from_settings(_image_base(given or source), runtime))
    if not report.ok:
        code = report.code if report.code == CODE_N_EXAMPLES else (
            "invalid_validation_file" if validation else "invalid_training_file")
        raise PrepareFailure(code, report.summary(), source.param)
    log(f"{label}: {report.n_examples:,} examples ({report.format} format)", n_examples=report.n_examples,
        format=report.format)
    if report.n_image_examples:
        log(f"{label}: {report.n_image_examples:,} examples hold {report.n_images:,} images",
            n_image_examples=report.n_image_examples, n_images=report.n_images)
    return report


def _fetch(src: DataSource | None, jobdir: JobDir, log: _Log, settings: RuntimeSpec) -> DataSource | None:
    """The source as a local file: remote data is downloaded into the job directory first."""
    from tuneyard.data.sources import SourceError, display_uri, is_remote, materialise

    if src is None or src.file_id and not is_remote(src.path):
        return src
    shown = display_uri(src.path)
    if is_remote(src.path):
        log(f"Downloading {shown}")
    try:
        local = materialise(src, jobdir.data / "raw", s3_endpoint_url=settings.s3_endpoint_url,
                            s3_ambient_credentials=settings.s3_ambient_credentials,
                            max_bytes=settings.max_download_bytes,
                            allow_private_hosts=settings.download_allow_private_hosts,
                            deadline_seconds=settings.download_timeout_seconds)
    except SourceError as e:
        code = "invalid_validation_file" if "validation" in src.param else "invalid_training_file"
        raise PrepareFailure(code, e.message, e.param) from None
    if local.path != src.path:
        size = Path(local.path).stat().st_size
        log(f"{'Fetched' if is_remote(src.path) else 'Read dataset directory'} {shown}: {size:,} bytes", bytes=size)
    return local


def _check_image_rows(spec: TrainingSpec, config: Any, image_rows: bool) -> None:
    """PrepareFailure (every reason at once) when the job cannot train on the image rows its data holds."""
    if not image_rows:
        return
    from tuneyard.data.vision import is_vision_model

    refusals = []
    if not is_vision_model(config):
        refusals.append(Problem("model", f"model '{spec.model.name}' takes text only (its config has no vision "
                                         "tower), and the training data holds image rows; choose a "
                                         "vision-language model or remove the images", "model_not_vision"))
    if spec.method != "sft":
        refusals.append(Problem("method", f"the training data holds image rows, and the '{spec.method}' method "
                                          "trains on text only; image rows train with 'sft'", "invalid_request"))
    if spec.data.lazy_tokenize or spec.data.streaming:
        what = "lazy_tokenize" if spec.data.lazy_tokenize else "streaming"
        refusals.append(Problem(what, f"{what} is not available for image rows: they are tokenised, with their "
                                      "images stored, before the job is queued", "invalid_request"))
    if refusals:
        raise PrepareFailure(refusals[0].code or "invalid_request", combined_message(refusals), refusals[0].param)


def _store_images(spec: TrainingSpec, jobdir: JobDir,
                  sources: list[tuple[DataSource | None, DataSource | None, ValidationReport | None]],
                  log: _Log) -> dict[str, str]:
    """Fetch and store every image of the job's rows once (data/images/); source REF -> stored REF."""
    from tuneyard.data.formats import image_refs
    from tuneyard.data.images import ImageError, ImageRules, ImageStore

    stored: dict[str, str] = {}
    for given, local, report in sources:
        if given is None or local is None or report is None or not report.n_image_examples:
            continue
        store = ImageStore(jobdir.data, ImageRules.from_settings(_image_base(given), spec.runtime), param=given.param,
                           max_pixels=spec.vision.max_pixels, min_pixels=spec.vision.min_pixels,
                           runtime=spec.runtime)
        fmt = normalize_format_name(report.format or local.format)
        code = "invalid_validation_file" if "validation" in given.param else "invalid_training_file"
        log(f"Fetching and storing the images of {given.param}")
        try:
            for n, row in iter_examples(local.path, fmt, local.container):
                for ref in image_refs(row):
                    try:
                        stored[ref] = store.put(ref)
                    except ImageError as e:
                        raise PrepareFailure(code, f"Example {n}: {e.message}", given.param) from None
                    except OSError as e:
                        raise PrepareFailure(code, f"Example {n}: image could not be read ({e.strerror or e})",
                                             given.param) from None
        finally:
            store.save_index()
        log(f"Stored the images of {given.param}: {len(stored):,} distinct, {store.n_fetched:,} downloaded, "
            f"{store.n_resized:,} resized, {store.bytes_stored:,} bytes written", n_stored=len(stored),
            n_fetched=store.n_fetched, n_resized=store.n_resized)
    return stored


def _write_split(rows: Iterator[tuple[int, dict]], n_rows: int, out: Path, ctx: _EncodeContext, split: str, *,
                 code: str, param: str) -> int:
    """Tokenise ``rows`` into the split at ``out``; its row count (0: nothing kept, no split written)."""
    from tuneyard.data.pipeline import RowError, encode_stream, features_for
    from tuneyard.data.splits import SplitWriter

    with SplitWriter(out, features_for(ctx.options)) as writer:
        try:
            for table in encode_stream(rows, ctx.tokenizer, ctx.options, ctx.stats[split],
                                       workers=_workers(n_rows, ctx.runtime)):
                writer.write_table(table)
        except RowError as e:
            raise PrepareFailure(code, str(e), param) from None
        return writer.commit()


@dataclasses.dataclass
class _EncodeContext:
    tokenizer: Any
    options: dict[str, Any]
    stats: dict[str, EncodeStats]
    runtime: RuntimeSpec
    # Each source image's stored REF (data/images/): rows are tokenised with these.
    stored: dict[str, str] = dataclasses.field(default_factory=dict)


def _rows(src: DataSource, fmt: str, keep: Callable[[int], bool],
          stored: dict[str, str] | None = None) -> Iterator[tuple[int, dict]]:
    """(example number, row) of ``src`` whose 0-based position passes ``keep``, its images' REFs the ``stored``
    ones."""
    from tuneyard.data.images import rewrite_refs

    for pos, (n, row) in enumerate(iter_examples(src.path, fmt, src.container)):
        if keep(pos):
            yield n, rewrite_refs(row, stored) if stored else row


def prepare(jobdir: JobDir, events: EventWriter | None = None, *, max_errors: int | None = None) -> PreparedOk:
    """Run the prepare step for ``jobdir``; return the ``prepared.json`` it succeeded with or raise PrepareFailure."""

    log = _Log(events)
    spec = TrainingSpec.model_validate_json(jobdir.spec.read_text())
    if max_errors is None:
        max_errors = spec.runtime.max_error_report
    data = spec.data
    # The service checked the spec against the capabilities table; a spec written by hand gets the same answer.
    unsupported = capabilities.check(spec)
    if unsupported:
        raise PrepareFailure(unsupported[0].code or "unsupported", combined_message(unsupported),
                             unsupported[0].param)

    # The data and the model are independent: a source that cannot be read must not hide a model that cannot
    # be loaded (nor the training file the validation file), so each is tried and every failure reported.
    failures = _Failures()
    train_src = val_src = train_report = val_report = None
    with failures.step():
        train_src = _fetch(data.train, jobdir, log, spec.runtime)
    if data.validation is not None:
        with failures.step():
            val_src = _fetch(data.validation, jobdir, log, spec.runtime)
    # The server's floor applies to every job; a dialect may ask for more (never fewer).
    min_examples = max(data.min_examples, spec.runtime.min_examples)
    if train_src is not None:
        with failures.step():
            train_report = _validate(train_src, validation=False, min_examples=min_examples,
                                     max_errors=max_errors, log=log, runtime=spec.runtime, method=spec.method,
                                     given=data.train)
            _check_rows_limit(spec, train_report.n_examples)
    if val_src is not None:
        with failures.step():
            val_report = _validate(val_src, validation=True, min_examples=1, max_errors=max_errors, log=log,
                                   runtime=spec.runtime, method=spec.method, given=data.validation)

    log(f"Loading the tokenizer of {spec.model.name}")
    config = tokenizer = None
    with failures.step():
        config, tokenizer = load_tokenizer(spec)
    failures.raise_if_any()
    assert train_src is not None and train_report is not None  # else a failure was raised just above
    image_rows = bool(train_report.n_image_examples or val_report is not None and val_report.n_image_examples)
    _check_image_rows(spec, config, image_rows)
    spec, processor = _vision_model(spec, config, log)
    # Stored before tokenising: the encoder reads each image's size from data/images (and a cached split names them).
    stored = _store_images(spec, jobdir, [(data.train, train_src, train_report),
                                          (data.validation, val_src, val_report)], log) if image_rows else {}
    text_tokenizer = tokenizer
    try:
        template = resolve_template(tokenizer, data.template if processor is None or data.template else
                                    _processor_template(processor))
    except ValueError as e:
        raise PrepareFailure("invalid_request", str(e), "template") from None
    context = getattr(config, "max_position_embeddings", None)
    if isinstance(context, int) and data.max_length > context:
        log(f"max_length {data.max_length} is longer than the model's context ({context} positions)", "warn")

    stats = {"train": EncodeStats(), "validation": EncodeStats()}
    options = {"template": template, "system_prompt": data.system_prompt, "max_length": data.max_length,
               "truncation": data.truncation, "train_on_input": data.train_on_input,
               "last_turn_only": data.last_turn_only, "rows": capabilities.RECIPES[spec.method].rows}
    if processor is not None:
        # Image rows: the processor's encoder, which reads the stored images' sizes from data/.
        options.update(rows="vision", data_dir=str(jobdir.data))
        tokenizer = processor

    train_fmt = normalize_format_name(train_report.format or train_src.format)
    held_out: set[int] = set()
    if val_src is None:
        n_all = train_report.n_examples
        held_out = split_positions(n_all, data.split.validation_ratio, data.split.type, spec.seed)
        if held_out:
            log(f"Split {n_all:,} examples: {n_all - len(held_out):,} for training, {len(held_out):,} for "
                f"validation ({data.split.type})")
        elif data.split.validation_ratio > 0:
            log("Too few examples to hold some out for validation: training on all of them", "warn")

    jobdir.data.mkdir(parents=True, exist_ok=True)
    # Lazy and streaming jobs tokenise in the trainer: the prepare step only checks that rows render.
    deferred = data.lazy_tokenize or data.streaming
    if deferred:
        _trial_encode(tokenizer, options, train_src, train_fmt, val_src, val_report)
    cache, key = _cache_for(spec, text_tokenizer, template, train_src, val_src, train_fmt, val_report, processor,
                            stored)
    hit = cache.fetch(key, jobdir.data) if cache is not None and not deferred else None
    if data.streaming:
        n_train, n_val = _write_stream_manifest(jobdir, spec, train_src, val_src, val_report, train_fmt,
                                                train_report.n_examples, len(held_out))
        log(f"Streaming: {n_train:,} training and {n_val:,} validation rows are read from the source and "
            "tokenised while training (token counts come from the trainer)", n_train=n_train, n_validation=n_val)
    elif data.lazy_tokenize:
        n_train, n_val = _store_rows(jobdir, train_src, val_src, val_report, train_fmt, held_out)
        log(f"Lazy tokenisation: {n_train:,} training and {n_val:,} validation rows stored; the trainer tokenises "
            "them batch by batch (token counts come from the trainer)", n_train=n_train, n_validation=n_val)
    elif hit is not None:
        n_train, n_val = hit["n_train"], hit["n_validation"]
        stats = {split: _stats(hit["stats"].get(split, {})) for split in ("train", "validation")}
        if not n_val:
            shutil.rmtree(jobdir.data / "validation", ignore_errors=True)
        log(f"Reused the tokenised data of an earlier job (cache key {key})", cache_key=key)
    else:
        n_train, n_val = _tokenise(jobdir, train_src, val_src, val_report, train_fmt, train_report.n_examples,
                                   held_out, _EncodeContext(tokenizer, options, stats, spec.runtime, stored))
        if cache is not None and n_train:
            cache.store(key, jobdir.data, ["train"] + (["validation"] if n_val else []),
                        {"n_train": n_train, "n_validation": n_val,
                         "stats": {k: dataclasses.asdict(v) for k, v in stats.items()}})

    tr, va = stats["train"], stats["validation"]
    if deferred and n_train:
        tr.examples, va.examples = n_train, n_val
    if spec.schedule.keep_best_checkpoint and not n_val:
        raise PrepareFailure("invalid_request", "keep_best_checkpoint needs validation data, and none is left: the "
                                                "file is too small to hold rows out", "keep_best_checkpoint")
    if n_train == 0:
        raise PrepareFailure("invalid_training_file",
                             f"no training example is left: {tr.dropped_too_long} longer than max_length "
                             f"{data.max_length} tokens, {tr.dropped_no_labels} with no token to train on",
                             train_src.param)
    _check_tokens_limit(spec, n_train, None if deferred else tr.tokens)
    if not deferred:
        _report_counts(log, n_train, n_val, tr, va, data.max_length, data.truncation)

    try:
        resolved = resolve(spec, n_train)
        if deferred:
            # The trainer renders rows itself: it needs the very template chosen here, not a name to resolve.
            resolved = resolved.model_copy(update={"data": resolved.data.model_copy(update={"template": template})})
        steps = total_steps(resolved, n_train)
    except TuneyardError as e:
        raise PrepareFailure(e.code, e.message, e.param) from None
    write_json_atomic(jobdir.resolved_spec, resolved.model_dump(mode="json"))
    hp = resolved.hyperparameters
    log(f"Resolved hyperparameters: {hp.n_epochs} epoch(s), batch size {hp.batch_size}, learning rate "
        f"{hp.learning_rate:g}: {steps:,} steps", total_steps=steps)
    return PreparedOk(
        n_train=n_train,
        n_validation=n_val,
        train_tokens=None if deferred else tr.tokens,
        trainable_tokens=None if deferred else tr.trainable_tokens,
        validation_tokens=None if deferred else va.tokens,
        truncated=tr.truncated + va.truncated,
        dropped=tr.dropped + va.dropped,
        total_steps=steps,
        format=train_report.format,
        template=template_label(text_tokenizer, data.template),
        hyperparameters=hp.model_dump(mode="json"),
    )


def _tokenise(jobdir: JobDir, train_src: DataSource, val_src: DataSource | None,
              val_report: ValidationReport | None, train_fmt: str, n_all: int, held_out: set[int],
              ctx: _EncodeContext) -> tuple[int, int]:
    """Tokenise the training rows (and the validation file or held-out rows) into the job's data/."""
    n_train = _write_split(_rows(train_src, train_fmt, lambda p: p not in held_out, ctx.stored), n_all - len(held_out),
                           jobdir.data / "train", ctx, "train", code="invalid_training_file", param=train_src.param)
    n_val = 0
    if val_src is not None and val_report is not None:
        val_fmt = normalize_format_name(val_report.format or val_src.format)
        n_val = _write_split(_rows(val_src, val_fmt, lambda p: True, ctx.stored), val_report.n_examples,
                             jobdir.data / "validation", ctx, "validation", code="invalid_validation_file",
                             param=val_src.param)
    elif held_out:
        n_val = _write_split(_rows(train_src, train_fmt, lambda p: p in held_out, ctx.stored), len(held_out),
                             jobdir.data / "validation", ctx, "validation", code="invalid_training_file",
                             param=train_src.param)
    else:
        shutil.rmtree(jobdir.data / "validation", ignore_errors=True)
    return n_train, n_val


def _store_rows(jobdir: JobDir, train_src: DataSource, val_src: DataSource | None,
                val_report: ValidationReport | None, train_fmt: str, held_out: set[int]) -> tuple[int, int]:
    """For lazy tokenisation: the converted rows (JSON, one column) of each split, streamed to Arrow files."""
    from tuneyard.data.splits import LAZY_COLUMN, SplitWriter, row_features

    def write(rows: Iterator[tuple[int, dict]], out: Path) -> int:
        with SplitWriter(out, row_features()) as writer:
            batch: list[str] = []
            for _, row in rows:
                batch.append(json.dumps(row, ensure_ascii=False))
                if len(batch) >= 1000:
                    writer.write_batch({LAZY_COLUMN: batch})
                    batch = []
            writer.write_batch({LAZY_COLUMN: batch})
            return writer.commit()

    n_train = write(_rows(train_src, train_fmt, lambda p: p not in held_out), jobdir.data / "train")
    n_val = 0
    if val_src is not None and val_report is not None:
        val_fmt = normalize_format_name(val_report.format or val_src.format)
        n_val = write(_rows(val_src, val_fmt, lambda p: True), jobdir.data / "validation")
    elif held_out:
        n_val = write(_rows(train_src, train_fmt, lambda p: p in held_out), jobdir.data / "validation")
    else:
        shutil.rmtree(jobdir.data / "validation", ignore_errors=True)
    return n_train, n_val


def _workers(n_examples: int, settings: RuntimeSpec) -> int:
    """Processes for tokenising a split: one per core (or the setting) for a big one, this one for a small one."""
    from tuneyard.data.pipeline import default_workers

    if n_examples < settings.prepare_parallel_min_examples:
        return 1
    return settings.prepare_workers or default_workers()


def _check_rows_limit(spec: TrainingSpec, n_examples: int) -> None:
    """PrepareFailure when the training file has more examples than one job may (TUNEYARD_MAX_EXAMPLES_PER_JOB)."""
    rows = spec.runtime.max_examples_per_job
    if rows and n_examples > rows:
        raise PrepareFailure("too_many_examples", f"the training set has {n_examples:,} examples, more than the "
                             f"{rows:,} this installation allows per job (TUNEYARD_MAX_EXAMPLES_PER_JOB)",
                             spec.data.train.param)


def _check_tokens_limit(spec: TrainingSpec, n_examples: int, tokens: int | None) -> None:
    """PrepareFailure when the training set has more tokens than one job may (TUNEYARD_MAX_TOKENS_PER_JOB).

    ``tokens`` is None where they are not counted up front (lazy, streaming): then every row at max_length
    must fit, the most such a job can train on.
    """
    most = spec.runtime.max_tokens_per_job
    if not most:
        return
    if tokens is not None and tokens > most:
        raise PrepareFailure("too_many_tokens", f"the training set has {tokens:,} tokens, more than the {most:,} this "
                             "installation allows per job (TUNEYARD_MAX_TOKENS_PER_JOB)", spec.data.train.param)
    if tokens is None and n_examples * spec.data.max_length > most:
        raise PrepareFailure("too_many_tokens", f"{n_examples:,} rows of up to max_length {spec.data.max_length} "
                             f"tokens may hold more than the {most:,} tokens this installation allows per job "
                             "(TUNEYARD_MAX_TOKENS_PER_JOB); lower max_length, or tokenise up front (no "
                             "lazy_tokenize or streaming) to count them exactly", spec.data.train.param)


TRIAL_ROWS = 256


def _trial_encode(tokenizer: Any, options: dict[str, Any], train_src: DataSource, train_fmt: str,
                  val_src: DataSource | None, val_report: ValidationReport | None) -> None:
    """Encode the first rows of each file, so that a template that cannot render them fails before the queue."""
    from itertools import islice

    from tuneyard.data.pipeline import make_encoder
    from tuneyard.data.tokenize import EncodeError

    encoder = make_encoder(tokenizer, {**options, "truncation": "truncate"})
    sources = [(train_src, train_fmt, "invalid_training_file")]
    if val_src is not None and val_report is not None:
        sources.append((val_src, normalize_format_name(val_report.format or val_src.format),
                        "invalid_validation_file"))
    for src, fmt, code in sources:
        rows = list(islice(_rows(src, fmt, lambda p: True), TRIAL_ROWS))
        try:
            encoder.encode([row for _, row in rows])
        except EncodeError as e:
            raise PrepareFailure(code, f"Example {rows[e.index or 0][0]}: {e}", src.param) from None


def _write_stream_manifest(jobdir: JobDir, spec: TrainingSpec, train_src: DataSource, val_src: DataSource | None,
                           val_report: ValidationReport | None, train_fmt: str, n_all: int,
                           n_held_out: int) -> tuple[int, int]:
    """For streaming: where the trainer reads each split from (no tokenised copy is made); the split sizes."""
    from tuneyard.data.splits import STREAM_FILE

    for split in ("train", "validation"):
        shutil.rmtree(jobdir.data / split, ignore_errors=True)
    source = {"path": train_src.path, "format": train_fmt, "container": train_src.container}
    manifest: dict[str, Any] = {"train": source, "validation": None, "held_out": None}
    if val_src is not None and val_report is not None:
        manifest["validation"] = {"path": val_src.path, "container": val_src.container,
                                  "format": normalize_format_name(val_report.format or val_src.format)}
        n_val = val_report.n_examples
    else:
        n_val = n_held_out
        if n_held_out:
            split = spec.data.split
            manifest["held_out"] = {"n": n_all, "ratio": split.validation_ratio, "kind": split.type,
                                    "seed": spec.seed}
    write_json_atomic(jobdir.data / STREAM_FILE, manifest)
    return n_all - n_held_out, n_val


def _stats(d: dict) -> EncodeStats:
    known = {f.name for f in dataclasses.fields(EncodeStats)}
    return EncodeStats(**{k: v for k, v in d.items() if k in known})


def _cache_for(spec: TrainingSpec, tokenizer: Any, template: str, train_src: DataSource,
               val_src: DataSource | None, train_fmt: str, val_report: ValidationReport | None,
               processor: Any = None, stored: dict[str, str] | None = None) -> tuple[TokenisedCache | None, str]:
    """The tokenised-data cache (None when switched off) and this job's key in it."""
    settings = spec.runtime
    if settings.tokenised_cache_bytes <= 0 or not settings.tokenised_cache_dir:
        return None, ""
    data = spec.data
    key = cache_key({
        "train": file_digest(train_src.path), "train_format": train_fmt,
        "validation": file_digest(val_src.path) if val_src is not None else None,
        "validation_format": val_report.format if val_report is not None else None,
        "tokenizer": tokenizer_digest(tokenizer), "template": template, "system_prompt": data.system_prompt,
        "max_length": data.max_length, "truncation": data.truncation, "train_on_input": data.train_on_input,
        "last_turn_only": data.last_turn_only, "rows": capabilities.RECIPES[spec.method].rows,
        # These decide which rows are held out for validation.
        "split": [data.split.type, data.split.validation_ratio, spec.seed] if val_src is None else None,
        # How many tokens each image expands to.
        "image_processor": processor.image_processor.to_json_string() if processor is not None else None,
        # The stored images the rows name (content-addressed): a source image that changed is another split.
        **({"images": sorted(stored.items())} if stored else {}),
    })
    return TokenisedCache(Path(settings.tokenised_cache_dir), settings.tokenised_cache_bytes), key


def _vision_model(spec: TrainingSpec, config: Any, log: _Log) -> tuple[TrainingSpec, Any]:
    """The spec (model_type 'vlm' when the config shows a vision-language model) and the model's processor, or None
    for a text model; PrepareFailure for model_type 'vlm' on a text model."""
    from tuneyard.data.vision import is_vision_model, load_processor

    m = spec.model
    if not is_vision_model(config):
        if m.model_type == "vlm":
            raise PrepareFailure("invalid_request", f"model_type is 'vlm', but {m.name} is a text-only model "
                                 f"({getattr(config, 'model_type', 'unknown')}) that takes no images", "model_type")
        return spec, None
    if m.model_type != "vlm":
        spec = spec.model_copy(update={"model": m.model_copy(update={"model_type": "vlm"})})
        unsupported = capabilities.check(spec)
        if unsupported:
            raise PrepareFailure(unsupported[0].code or "unsupported",
                                 f"{m.name} is a vision-language model: " + combined_message(unsupported),
                                 unsupported[0].param)
        log(f"{m.name} is a vision-language model ({config.model_type}): trained as model_type 'vlm'")
    try:
        processor = load_processor(m.name, revision=m.revision, trust_remote_code=m.trust_remote_code,
                                   max_pixels=spec.vision.max_pixels, min_pixels=spec.vision.min_pixels)
    except Exception as e:
        raise PrepareFailure("model_not_found", f"the processor of '{m.name}' could not be loaded: {_first_line(e)}",
                             "model") from e
    return spec, processor


def _processor_template(processor: Any) -> str | None:
    from tuneyard.data.vision import processor_template

    return processor_template(processor)


def _report_counts(log: _Log, n_train: int, n_val: int, tr: EncodeStats, va: EncodeStats, max_length: int,
                   truncation: str) -> None:
    log(f"Tokenised {n_train:,} training examples: {tr.tokens:,} tokens, {tr.trainable_tokens:,} trained "
        f"({tr.truncated:,} truncated, {tr.dropped:,} dropped)", n_train=n_train, train_tokens=tr.tokens,
        trainable_tokens=tr.trainable_tokens, truncated=tr.truncated, dropped=tr.dropped)
    if n_val:
        log(f"Tokenised {n_val:,} validation examples: {va.tokens:,} tokens ({va.truncated:,} truncated, "
            f"{va.dropped:,} dropped)", n_validation=n_val, validation_tokens=va.tokens)
    too_long = tr.dropped_too_long + va.dropped_too_long
    if too_long:
        why = "" if truncation == "drop" else " (truncating them left nothing to train on)"
        log(f"{too_long:,} example(s) longer than max_length {max_length} were dropped{why}", "warn")
    no_labels = tr.dropped_no_labels + va.dropped_no_labels
    if no_labels:
        log(f"{no_labels:,} example(s) had no token to train on and were dropped", "warn")
    if tr.segmented + va.segmented:
        log(f"The chat template rewrites earlier turns: {tr.segmented + va.segmented:,} example(s) were "
            "built turn by turn", "warn")


def run(root: str | Path) -> int:
    """Prepare the job at ``root``, always leaving a ``prepared.json``; the process exit status."""
    jobdir = JobDir(Path(root))
    for stale in (jobdir.prepared, jobdir.resolved_spec):
        stale.unlink(missing_ok=True)
    events = EventWriter(jobdir.events, "prepare")
    try:
        result = prepare(jobdir, events)
    except PrepareFailure as f:
        # No error event here: the scheduler reports the failure from prepared.json, once.
        print(f"[prepare] error: {f.code}: {f.message}", flush=True)
        jobdir.write_prepared(PreparedFailed(error=f.to_error()))
        return 0
    except Exception as e:
        traceback.print_exc()
        message = f"data preparation failed: {type(e).__name__}: {_first_line(e)}"
        jobdir.write_prepared(PreparedFailed(error=JobError(code=INTERNAL_ERROR, message=message)))
        return 1
    jobdir.write_prepared(result)
    return 0


def standby() -> int:
    """Import what a prepare step needs, then wait for the worker to name a job; prepare it as ``run`` does.

    The worker keeps one such process ready (``scheduler/local.py``), so a job's prepare step starts
    without the seconds of importing transformers. The order comes on stdin (``tuneyard.standby``); end of
    input (the worker is gone) ends the process.
    """
    # What a prepare step loads on its way (loading a model's config alone pulls in torch through transformers'
    # activations), so that the step itself imports next to nothing.
    import datasets  # noqa: F401
    import torch  # noqa: F401
    import transformers.activations  # noqa: F401
    from transformers import AutoConfig, AutoTokenizer  # noqa: F401

    import tuneyard.data.cache  # noqa: F401
    import tuneyard.data.sources  # noqa: F401
    import tuneyard.data.splits  # noqa: F401
    from tuneyard.standby import take_order

    root = take_order()
    return 0 if root is None else run(root)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: ``python -m tuneyard.data.prepare JOBDIR`` (or ``--standby``, for the worker)."""
    args = sys.argv[1:] if argv is None else argv
    if args == ["--standby"]:
        return standby()
    if len(args) != 1:
        print("usage: python -m tuneyard.data.prepare JOBDIR", file=sys.stderr)
        return 2
    return run(args[0])


if __name__ == "__main__":
    status = main()
    # Tearing down an interpreter that holds torch and transformers takes about a second, and the worker waits
    # for this exit to queue the job: every result is written, fsynced and closed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    import os

    os._exit(status)
