"""Preference (DPO) rows into ``prompt_ids`` + ``chosen_ids`` + ``rejected_ids``, a batch at a time.

A row in the internal form (``{"prompt": [...], "chosen": [...], "rejected": [...], "tools"?}``, see
``data/formats.py``) is rendered with the model's chat template three times: the prompt with the generation
prompt, the prompt followed by the chosen answer, and by the rejected one. The prompt's tokens are the
common prefix of the three tokenisations; each answer is the rest of its own (so an answer's first token
is never split from a prompt token it merged with). That is what TRL's ``DPOTrainer`` does when it
tokenises a conversational preference set; doing it here, in the prepare step, lets rows be checked and
counted before the job is queued, cached across jobs and never tokenised again on resume.

Length: ``max_length`` bounds prompt + answer. A longer pair keeps its prompt and has its answers cut
(``truncation: "truncate"``; an answer that must lose all its tokens drops the row) or is dropped
(``"drop"``); a prompt that alone leaves no room is dropped either way.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from tuneyard.data.formats import is_preference_row
from tuneyard.data.templates import resolve_template
from tuneyard.data.tokenize import EncodeError, EncodeStats, _Renderer, _template_messages

COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


class PreferencePair(NamedTuple):
    """One tokenised preference pair: int32 token ids of the prompt and of each answer."""

    prompt_ids: np.ndarray
    chosen_ids: np.ndarray
    rejected_ids: np.ndarray


class PreferenceEncoder:
    """Tokenises internal-form preference rows (see the module docstring); the same interface as
    ``ConversationEncoder`` so the pipeline runs either."""

    def __init__(self, tokenizer: Any, *, template: str | None = None, system_prompt: str | None = None,
                 max_length: int = 2048, truncation: str = "truncate", **_ignored: Any) -> None:
        # train_on_input / last_turn_only are SFT masking choices: a preference pair is always scored on its
        # answers only, and the capability check refuses them for DPO before a job gets here.
        self.tokenizer = tokenizer
        self.template_name = template
        self.system_prompt = system_prompt
        self.max_length = max_length
        self.truncation = truncation
        self._template: str | None = None
        self._special_tokens = dict(tokenizer.special_tokens_map)

    @property
    def template(self) -> str:
        """The Jinja source in use, resolved on first need."""
        if self._template is None:
            self._template = resolve_template(self.tokenizer, self.template_name)
        return self._template

    def encode(self, rows: list[dict], stats: EncodeStats | None = None) -> list[PreferencePair | None]:
        """The pairs of ``rows`` (None where dropped; see ``stats``); EncodeError (with ``index``) on a bad row."""
        stats = stats if stats is not None else EncodeStats()
        texts: list[str] = []
        for j, row in enumerate(rows):
            try:
                texts.extend(self._render(row))
            except EncodeError as e:
                e.index = j
                raise
        ids = self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"] if texts \
            else []
        out: list[PreferencePair | None] = []
        for j in range(len(rows)):
            prompt, chosen, rejected = (np.asarray(x, dtype=np.int32) for x in ids[3 * j: 3 * j + 3])
            out.append(self._finish(prompt, chosen, rejected, stats))
        return out

    def _render(self, row: dict) -> list[str]:
        if not is_preference_row(row):
            raise EncodeError("a supervised row cannot be tokenised for preference training (DPO): it needs a "
                              "preferred and a rejected answer")
        prompt = list(row["prompt"])
        if self.system_prompt and not any(m["role"] == "system" for m in prompt):
            prompt.insert(0, {"role": "system", "content": self.system_prompt})
        render = _Renderer(self.tokenizer, self.template, row.get("tools"), self._special_tokens)
        prompt_text = render(_template_messages(prompt), generation_prompt=True)
        chosen_text, rejected_text = render.many([_template_messages(prompt + list(row["chosen"])),
                                                  _template_messages(prompt + list(row["rejected"]))])
        return [prompt_text, chosen_text, rejected_text]

    def _finish(self, prompt: np.ndarray, chosen: np.ndarray, rejected: np.ndarray,
                stats: EncodeStats) -> PreferencePair | None:
        n = min(_common_prefix(prompt, chosen), _common_prefix(prompt, rejected))
        pair = PreferencePair(prompt[:n], chosen[n:], rejected[n:])
        if len(pair.chosen_ids) == 0 or len(pair.rejected_ids) == 0:
            stats.dropped_no_labels += 1
            return None
        room = self.max_length - len(pair.prompt_ids)
        longest = max(len(pair.chosen_ids), len(pair.rejected_ids))
        if longest > room:
            if self.truncation == "drop" or room <= 0:
                stats.dropped_too_long += 1
                return None
            pair = PreferencePair(pair.prompt_ids, pair.chosen_ids[:room], pair.rejected_ids[:room])
            stats.truncated += 1
        stats.examples += 1
        answers = len(pair.chosen_ids) + len(pair.rejected_ids)
        # The prompt is run twice (once with each answer): both count as tokens the step processes.
        stats.tokens += 2 * len(pair.prompt_ids) + answers
        stats.trainable_tokens += answers
        return pair


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def preference_table(pairs: list[PreferencePair]):
    """A pyarrow table of pairs, one list<int32> column each, built from the arrays without a Python int each."""
    import pyarrow as pa

    def column(arrays: list[np.ndarray]) -> pa.Array:
        lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int32)
        return pa.ListArray.from_arrays(offsets, pa.array(flat, type=pa.int32()))

    return pa.table({name: column([p[i] for p in pairs]) for i, name in enumerate(COLUMNS)})


def preference_features():
    """Columns of a tokenised preference split."""
    import datasets

    return datasets.Features({name: datasets.List(datasets.Value("int32")) for name in COLUMNS})
