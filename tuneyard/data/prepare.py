"""The prepare step of a job: ``python -m tuneyard.data.prepare JOBDIR``.

Reads ``spec.json``, checks that the model's config and tokenizer load, validates the data files,
tokenises them (streaming, through ``datasets.Dataset.from_generator``) into ``data/train`` and
``data/validation`` (columns ``input_ids`` and ``labels``), resolves the "auto" hyperparameters from the
number of training examples into ``resolved_spec.json`` and finally writes ``prepared.json`` (atomically,
last, so that its presence means the step finished)::

    {"ok": true, "n_train", "n_validation", "train_tokens", "trainable_tokens", "validation_tokens",
     "truncated", "dropped", "total_steps", "format", "template", "hyperparameters": {...}}
    {"ok": false, "error": {"code", "message", "param"}}

Error codes: ``invalid_training_file``, ``invalid_validation_file``, ``invalid_n_examples``,
``model_not_found``, ``invalid_request`` (a setting that cannot work, e.g. an unknown template) and
``internal_error`` (a bug: exit status 1). A failure the caller can fix exits 0: the step did its job.
Nothing from the environment or the spec's integrations is ever printed.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import sys
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tuneyard.data.cache import TokenisedCache, cache_key, file_digest, tokenizer_digest
from tuneyard.data.formats import normalize_format_name
from tuneyard.data.templates import resolve_template, template_label
from tuneyard.data.tokenize import EncodeError, EncodeStats, encode_conversation
from tuneyard.data.validate import CODE_N_EXAMPLES, ValidationReport, iter_examples, validate_file
from tuneyard.domain.errors import TuneyardError
from tuneyard.domain.hparams import resolve, total_steps
from tuneyard.domain.spec import DataSource, TrainingSpec
from tuneyard.jobdir import EventWriter, JobDir, write_json_atomic

INTERNAL_ERROR = "internal_error"


class PrepareFailure(Exception):
    """A failure the caller can act on; becomes ``prepared.json`` ``{"ok": false, "error": ...}``."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "param": self.param}


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


def _validate(source: DataSource, *, validation: bool, min_examples: int, max_errors: int,
              log: _Log) -> ValidationReport:
    label = "Validation file" if validation else "Training file"
    log(f"Validating {label.lower()}")
    report = validate_file(source.path, source.format, source.container, max_errors=max_errors,
                           min_examples=min_examples, label=label)
    if not report.ok:
        code = report.code if report.code == CODE_N_EXAMPLES else (
            "invalid_validation_file" if validation else "invalid_training_file")
        raise PrepareFailure(code, report.summary(), source.param)
    log(f"{label}: {report.n_examples:,} examples ({report.format} format)", n_examples=report.n_examples,
        format=report.format)
    return report


def _fetch(src: DataSource | None, jobdir: JobDir, log: _Log) -> DataSource | None:
    """The source as a local file: remote data is downloaded into the job directory first."""
    from tuneyard.data.sources import SourceError, display_uri, is_remote, materialise
    from tuneyard.settings import get_settings

    if src is None or src.file_id and not is_remote(src.path):
        return src
    settings = get_settings()
    shown = display_uri(src.path)
    if is_remote(src.path):
        log(f"Downloading {shown}")
    try:
        local = materialise(src, jobdir.data / "raw", s3_endpoint_url=settings.s3_endpoint_url,
                            s3_ambient_credentials=settings.s3_ambient_credentials,
                            max_bytes=settings.max_download_bytes)
    except SourceError as e:
        code = "invalid_validation_file" if "validation" in src.param else "invalid_training_file"
        raise PrepareFailure(code, e.message, e.param) from None
    if local.path != src.path:
        size = Path(local.path).stat().st_size
        log(f"{'Fetched' if is_remote(src.path) else 'Read dataset directory'} {shown}: {size:,} bytes", bytes=size)
    return local


def split_positions(n: int, ratio: float, kind: str, seed: int) -> set[int]:
    """0-based positions of the examples that go to validation when it is carved from the training file."""
    if ratio <= 0 or n < 2:
        return set()
    n_val = min(n - 1, max(1, round(n * ratio)))
    if kind == "sequential":
        return set(range(n - n_val, n))
    return set(random.Random(seed).sample(range(n), n_val))


def _build_dataset(rows: Iterator[tuple[int, dict]], encode: Callable[[dict], dict | None], out: Path,
                   scratch: Path, *, code: str, param: str) -> int:
    """Tokenise ``rows`` into a dataset saved at ``out``; return its row count (0: nothing written)."""
    import datasets

    failure: list[PrepareFailure] = []

    def encoded() -> Iterator[dict]:
        for n, row in rows:
            try:
                enc = encode(row)
            except EncodeError as e:
                failure.append(PrepareFailure(code, f"Example {n}: {e}", param))
                return
            if enc is not None:
                yield enc

    stream = encoded()
    # datasets refuses an empty generator: look at the first kept row before building.
    first = next(stream, None)
    if failure:
        raise failure[0]
    if first is None:
        shutil.rmtree(out, ignore_errors=True)
        return 0

    def generate() -> Iterator[dict]:
        yield first
        yield from stream

    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                                  "labels": datasets.Sequence(datasets.Value("int32"))})
    # A fresh fingerprint and cache: the rows come from a file the generator's hash knows nothing about,
    # so a cached result must never be reused.
    try:
        ds = datasets.Dataset.from_generator(generate, features=features, cache_dir=str(scratch),
                                             fingerprint=uuid.uuid4().hex)
    except Exception:
        if failure:
            raise failure[0] from None
        raise
    if failure:
        raise failure[0]
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    ds.save_to_disk(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return len(ds)


def _rows(src: DataSource, fmt: str, keep: Callable[[int], bool]) -> Iterator[tuple[int, dict]]:
    """(example number, row) of ``src`` whose 0-based position passes ``keep``."""
    for pos, (n, row) in enumerate(iter_examples(src.path, fmt, src.container)):
        if keep(pos):
            yield n, row


def prepare(jobdir: JobDir, events: EventWriter | None = None, *, max_errors: int | None = None) -> dict:
    """Run the prepare step for ``jobdir``; return the ``prepared.json`` payload or raise PrepareFailure."""

    log = _Log(events)
    if max_errors is None:
        from tuneyard.settings import get_settings

        max_errors = get_settings().max_error_report
    spec = TrainingSpec.model_validate_json(jobdir.spec.read_text())
    data = spec.data
    if spec.method != "sft":
        raise PrepareFailure("invalid_request", "the prepare step handles supervised fine-tuning ('sft') "
                                                f"only, not '{spec.method}'", "method")

    train_src, val_src = _fetch(data.train, jobdir, log), _fetch(data.validation, jobdir, log)
    train_report = _validate(train_src, validation=False, min_examples=data.min_examples,
                             max_errors=max_errors, log=log)
    val_report = None
    if val_src is not None:
        val_report = _validate(val_src, validation=True, min_examples=1, max_errors=max_errors, log=log)

    log(f"Loading the tokenizer of {spec.model.name}")
    config, tokenizer = load_tokenizer(spec)
    try:
        template = resolve_template(tokenizer, data.template)
    except ValueError as e:
        raise PrepareFailure("invalid_request", str(e), "template") from None
    context = getattr(config, "max_position_embeddings", None)
    if isinstance(context, int) and data.max_length > context:
        log(f"max_length {data.max_length} is longer than the model's context ({context} positions)", "warn")

    stats = {"train": EncodeStats(), "validation": EncodeStats()}

    def encoder(split: str) -> Callable[[dict], dict | None]:
        def encode(row: dict) -> dict | None:
            return encode_conversation(tokenizer, row, template=template, system_prompt=data.system_prompt,
                                       max_length=data.max_length, truncation=data.truncation,
                                       train_on_input=data.train_on_input, last_turn_only=data.last_turn_only,
                                       stats=stats[split])
        return encode

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
    cache, key = _cache_for(spec, tokenizer, template, train_src, val_src, train_fmt, val_report)
    hit = cache.fetch(key, jobdir.data) if cache is not None and not data.lazy_tokenize else None
    if data.lazy_tokenize:
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
        n_train, n_val = _tokenise(jobdir, train_src, val_src, val_report, train_fmt, held_out, encoder)
        if cache is not None and n_train:
            cache.store(key, jobdir.data, ["train"] + (["validation"] if n_val else []),
                        {"n_train": n_train, "n_validation": n_val,
                         "stats": {k: dataclasses.asdict(v) for k, v in stats.items()}})

    tr, va = stats["train"], stats["validation"]
    if data.lazy_tokenize and n_train:
        tr.examples, va.examples = n_train, n_val
    if n_train == 0:
        raise PrepareFailure("invalid_training_file",
                             f"no training example is left: {tr.dropped_too_long} longer than max_length "
                             f"{data.max_length} tokens, {tr.dropped_no_labels} with no token to train on",
                             train_src.param)
    if not data.lazy_tokenize:
        _report_counts(log, n_train, n_val, tr, va, data.max_length, data.truncation)

    try:
        resolved = resolve(spec, n_train)
        if data.lazy_tokenize:
            # The trainer renders rows itself: it needs the very template chosen here, not a name to resolve.
            resolved = resolved.model_copy(update={"data": resolved.data.model_copy(update={"template": template})})
        steps = total_steps(resolved, n_train)
    except TuneyardError as e:
        raise PrepareFailure(e.code, e.message, e.param) from None
    write_json_atomic(jobdir.resolved_spec, resolved.model_dump(mode="json"))
    hp = resolved.hyperparameters
    log(f"Resolved hyperparameters: {hp.n_epochs} epoch(s), batch size {hp.batch_size}, learning rate "
        f"{hp.learning_rate:g}: {steps:,} steps", total_steps=steps)
    return {
        "ok": True,
        "n_train": n_train,
        "n_validation": n_val,
        "train_tokens": None if data.lazy_tokenize else tr.tokens,
        "trainable_tokens": None if data.lazy_tokenize else tr.trainable_tokens,
        "validation_tokens": None if data.lazy_tokenize else va.tokens,
        "truncated": tr.truncated + va.truncated,
        "dropped": tr.dropped + va.dropped,
        "total_steps": steps,
        "format": train_report.format,
        "template": template_label(tokenizer, data.template),
        "hyperparameters": hp.model_dump(mode="json"),
    }


def _tokenise(jobdir: JobDir, train_src: DataSource, val_src: DataSource | None,
              val_report: ValidationReport | None, train_fmt: str, held_out: set[int],
              encoder: Callable[[str], Callable[[dict], dict | None]]) -> tuple[int, int]:
    """Tokenise the training rows (and the validation file or held-out rows) into the job's data/."""
    import datasets

    scratch = jobdir.data / f".cache-{uuid.uuid4().hex[:8]}"
    datasets.disable_progress_bars()
    try:
        n_train = _build_dataset(_rows(train_src, train_fmt, lambda p: p not in held_out), encoder("train"),
                                 jobdir.data / "train", scratch, code="invalid_training_file",
                                 param=train_src.param)
        n_val = 0
        if val_src is not None and val_report is not None:
            val_fmt = normalize_format_name(val_report.format or val_src.format)
            n_val = _build_dataset(_rows(val_src, val_fmt, lambda p: True), encoder("validation"),
                                   jobdir.data / "validation", scratch, code="invalid_validation_file",
                                   param=val_src.param)
        elif held_out:
            n_val = _build_dataset(_rows(train_src, train_fmt, lambda p: p in held_out),
                                   encoder("validation"), jobdir.data / "validation", scratch,
                                   code="invalid_training_file", param=train_src.param)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if n_val == 0:
        shutil.rmtree(jobdir.data / "validation", ignore_errors=True)

    return n_train, n_val


LAZY_COLUMN = "row"


def _store_rows(jobdir: JobDir, train_src: DataSource, val_src: DataSource | None,
                val_report: ValidationReport | None, train_fmt: str, held_out: set[int]) -> tuple[int, int]:
    """For lazy tokenisation: the converted rows (JSON, one column) of each split, streamed to Arrow files."""
    import datasets

    def write(rows: Iterator[tuple[int, dict]], out: Path) -> int:
        shutil.rmtree(out, ignore_errors=True)
        stream = ({LAZY_COLUMN: json.dumps(row, ensure_ascii=False)} for _, row in rows)
        first = next(stream, None)
        if first is None:  # datasets refuses to build an empty split
            return 0

        def gen() -> Iterator[dict]:
            yield first
            yield from stream

        scratch = jobdir.data / f".cache-{uuid.uuid4().hex[:8]}"
        features = datasets.Features({LAZY_COLUMN: datasets.Value("string")})
        try:
            ds = datasets.Dataset.from_generator(gen, features=features, cache_dir=str(scratch),
                                                 fingerprint=uuid.uuid4().hex)
            ds.save_to_disk(str(out))
            return len(ds)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    datasets.disable_progress_bars()
    n_train = write(_rows(train_src, train_fmt, lambda p: p not in held_out), jobdir.data / "train")
    n_val = 0
    if val_src is not None and val_report is not None:
        val_fmt = normalize_format_name(val_report.format or val_src.format)
        n_val = write(_rows(val_src, val_fmt, lambda p: True), jobdir.data / "validation")
    elif held_out:
        n_val = write(_rows(train_src, train_fmt, lambda p: p in held_out), jobdir.data / "validation")
    if not n_val:
        shutil.rmtree(jobdir.data / "validation", ignore_errors=True)
    return n_train, n_val


def _stats(d: dict) -> EncodeStats:
    known = {f.name for f in dataclasses.fields(EncodeStats)}
    return EncodeStats(**{k: v for k, v in d.items() if k in known})


def _cache_for(spec: TrainingSpec, tokenizer: Any, template: str, train_src: DataSource,
               val_src: DataSource | None, train_fmt: str, val_report: ValidationReport | None
               ) -> tuple[TokenisedCache | None, str]:
    """The tokenised-data cache (None when switched off) and this job's key in it."""
    from tuneyard.settings import get_settings

    settings = get_settings()
    if settings.tokenised_cache_bytes <= 0:
        return None, ""
    data = spec.data
    key = cache_key({
        "train": file_digest(train_src.path), "train_format": train_fmt,
        "validation": file_digest(val_src.path) if val_src is not None else None,
        "validation_format": val_report.format if val_report is not None else None,
        "tokenizer": tokenizer_digest(tokenizer), "template": template, "system_prompt": data.system_prompt,
        "max_length": data.max_length, "truncation": data.truncation, "train_on_input": data.train_on_input,
        "last_turn_only": data.last_turn_only,
        # These decide which rows are held out for validation.
        "split": [data.split.type, data.split.validation_ratio, spec.seed] if val_src is None else None,
    })
    return TokenisedCache(settings.home / "cache" / "tokenised", settings.tokenised_cache_bytes), key


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
        write_json_atomic(jobdir.prepared, {"ok": False, "error": f.to_dict()})
        return 0
    except Exception as e:
        traceback.print_exc()
        message = f"data preparation failed: {type(e).__name__}: {_first_line(e)}"
        write_json_atomic(jobdir.prepared, {"ok": False, "error": {"code": INTERNAL_ERROR, "message": message,
                                                                   "param": None}})
        return 1
    write_json_atomic(jobdir.prepared, result)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: ``python -m tuneyard.data.prepare JOBDIR``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m tuneyard.data.prepare JOBDIR", file=sys.stderr)
        return 2
    return run(args[0])


if __name__ == "__main__":
    sys.exit(main())
