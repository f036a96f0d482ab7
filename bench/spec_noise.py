"""Which spec-fuzz failures are the reference documents' noise rather than tuneyard's faults.

Each rule names the reason; ``docs/spec-conformance.md`` gives the same list for readers. A failure that no
rule matches is a finding. Rules match on what the failure is about (the schema path, the status), never on
a whole operation, so that a new fault in the same operation still shows.
"""

from __future__ import annotations

import json
import re
from typing import Any

# Findings that other branches of issue 12 fix; until they are merged they are reported apart, not as noise.
PENDING = {
    "file_nulls": "null expires_at / status_details on a file (fixed in the null-optional-fields branch)",
    "checkpoint_nulls": "null valid metrics on a checkpoint (fixed in the null-optional-fields branch)",
}
PENDING_PREFIX = "pending: "


def _body(response: Any) -> Any:
    try:
        return json.loads(response.text)
    except ValueError:
        return None


def classify(target: str, operation: str, check: str, failure: Any, case: Any, response: Any) -> str | None:
    """Why this failure is the document's (or pending elsewhere); None when it is a finding."""
    message = " ".join(str(failure.message).split())
    status = response.status_code
    if check == "not_a_server_error":
        return None
    if target == "openai":
        return _openai(operation, check, message, status, case, response)
    return _llamastack(operation, check, message, status, case, response)


def _openai(operation: str, check: str, message: str, status: int, case: Any, response: Any) -> str | None:
    if check == "status_code_conformance" and 400 <= status < 500:
        return "the document gives every operation a 200 response only: no error status is documented"
    if check == "response_schema_conformance":
        if "/properties/status" in message and '"paused"' in message:
            return ("FineTuningJob.status omits 'paused', which the document's own pause endpoint returns")
        if "ListFilesResponse/properties/first_id" in message or "ListFilesResponse/properties/last_id" in message:
            body = _body(response)
            if isinstance(body, dict) and body.get("data") == []:
                return "first_id/last_id are required strings, which an empty page cannot have: null is sent"
        if "/properties/expires_at" in message or "/properties/status_details" in message:
            return PENDING_PREFIX + PENDING["file_nulls"]
        if "/properties/purpose" in message and '"evals"' in message:
            return ("the upload request allows purpose 'evals', the File object's enum omits it: the file "
                    "is described with the purpose it was uploaded with")
        if "FineTuningJobCheckpoint/properties/metrics" in message and "Value: null" in message:
            return PENDING_PREFIX + PENDING["checkpoint_nulls"]
    if check == "content_type_conformance" and operation == "GET /files/{file_id}/content":
        return ("the content is the file's own bytes (JSONL is not one JSON document), served as "
                "application/octet-stream; the document types it as a JSON string")
    if check == "positive_data_acceptance" and status == 400:
        return _openai_refused_valid(operation, response)
    if check == "negative_data_rejection" and "in query" in message and "metadata" in message:
        return ("a metadata[k] query value is text on the wire: the 'non-string' value generated for it "
                "arrives as a valid string")
    return None


def _openai_refused_valid(operation: str, response: Any) -> str | None:
    body = _body(response)
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return None
    text, param, code = str(err.get("message", "")), err.get("param"), err.get("code")
    if param and param.startswith("metadata") and "NUL" in text:
        return ("metadata may hold any character in the document; a NUL can be neither stored in every "
                "database nor searched for, and is refused naming the key")
    if param == "limit" and "between 1 and" in text:
        return ("limit has no bounds in the schema; tuneyard refuses values outside 1..10000 for files (the "
                "range the document's prose gives) and 1..1000 for jobs, events and checkpoints")
    if "Unrecognized request argument" in text:
        return ("the request schemas allow any extra property; the live API refuses unknown arguments "
                "with this very message, and tuneyard never accepts a setting it would ignore")
    if operation == "POST /fine_tuning/jobs":
        if "either in 'method' or at the top level" in text:
            return ("hyperparameters given both at the top level (deprecated) and in method: the document allows "
                    "both at once; tuneyard refuses rather than silently pick one")
        if code == "unsupported_method":
            return "a method this installation cannot run is refused naming it, never accepted and ignored"
        if param == "suffix" and "may contain only" in text:
            return ("suffix has no pattern in the document; it becomes part of the model's name "
                    "(ft:base:org:suffix:id) and so is held to letters, digits, '-', '_' and '.'")
        if code == "model_not_found":
            return "the model names the document lists are OpenAI's; tuneyard trains models it can load"
        if code == "file_not_found" or param in ("training_file", "validation_file"):
            return "a generated file id names no uploaded file (400 naming the field, as the live API does)"
        if "at least 1 character" in text:
            return "model and training_file have no minLength; an empty id names nothing"
    if operation == "POST /files" and param == "file":
        return ("the document cannot say that a fine-tune file must be JSONL rows, nor that a file is not "
                "empty: generated bytes are refused naming the file")
    return None


# A negation that lands on a type another branch of the same oneOf allows (metadata and row values may be any
# JSON value), and null for an optional field: still valid for Llama Stack's own server (pydantic Optional).
_LS_STILL_VALID = re.compile(r"violates `type` at (/properties/metadata/additionalProperties/oneOf/\d+|"
                             r"/properties/source/oneOf/1/allOf/0/properties/rows/items/additionalProperties/oneOf/\d+"
                             r") \(was \w+, became (integer|number|string|boolean|null|array|object)\)|"
                             r"violates `type` at /properties/\w+ \(was string, became null\)")


def _llamastack(operation: str, check: str, message: str, status: int, case: Any, response: Any) -> str | None:
    if check == "negative_data_rejection":
        violations = re.findall(r"violates `[^`]+` at \S+ \(was \w+, became \w+\)", message)
        if violations and all(_LS_STILL_VALID.fullmatch(v) for v in violations):
            return ("the 'invalid' value is still valid: another branch of the same any-JSON-value oneOf allows "
                    "it, or it is null for an optional field, which Llama Stack's server (pydantic Optional) "
                    "reads as absent")
    if check == "positive_data_acceptance" and status == 400:
        body = _body(response)
        detail = str(body.get("detail", "")) if isinstance(body, dict) else ""
        if "at least 1 character" in detail or "non-empty string" in detail:
            return "ids, names and URIs have no minLength in the document; an empty one names nothing"
        if "greater than or equal to 1" in detail:
            return "n_epochs, max_steps_per_epoch and the like have no minimum; zero of them trains nothing"
        if "less than or equal to" in detail:
            return ("the training numbers have no maximum in the document; tuneyard's bounds (n_epochs <= 1000, "
                    "gradient_accumulation_steps <= 1024, ...) refuse what no run could do, naming each field")
        if "source.rows must be a non-empty list" in detail or "unrecognised row format" in detail:
            return ("rows has no minItems and its rows no required fields in the document; an empty dataset, "
                    "or a row with nothing to train on, is refused naming the row")
        if "not available in this installation" in detail:
            return "a method this installation cannot run is refused naming it, never accepted and ignored"
        if detail.startswith("dataset_id must be"):
            return ("dataset_id has no pattern in the document; it becomes a path segment (/v1/datasets/{id}) "
                    "and so is held to letters, digits and . _ : / -")
        if "the scheme is not supported" in detail:
            return ("source.uri is any string in the document; tuneyard fetches https://, s3://, hf://, data: "
                    "URIs and local paths, and names the field for anything else")
    return None
