"""One generation request on a loaded model: the prompt (messages through the chat template, or raw text), its
checks against the context length, and the choices, streamed as events as their tokens come."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

from tuneyard.domain.generation import GenerationRequest
from tuneyard.inference.cache import Loaded

_END = object()


class GenerationError(Exception):
    """A request the model cannot serve as asked: the API turns it into the dialect's 4xx."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "param": self.param, "code": self.code, "status": self.status}}


def context_length(loaded: Loaded) -> int:
    """The most tokens (prompt and completion) the model takes."""
    n = getattr(loaded.model.config, "max_position_embeddings", None)
    return int(n or loaded.tokenizer.model_max_length)


def encode(loaded: Loaded, req: GenerationRequest) -> tuple[list[int], int]:
    """The prompt's token ids and the completion's token limit, or GenerationError naming the field."""
    tok = loaded.tokenizer
    param = "messages" if req.messages is not None else "prompt"
    if req.messages is not None:
        if not tok.chat_template:
            raise GenerationError("This model has no chat template: use /v1/completions with a prompt",
                                  param="messages", code="no_chat_template")
        ids = tok.apply_chat_template(req.messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        ids = list(ids["input_ids"])
    else:
        ids = tok(req.prompt or "", add_special_tokens=True)["input_ids"]
    limit = context_length(loaded)
    room = limit - len(ids)
    wanted = req.max_tokens if req.max_tokens is not None else room
    if room <= 0 or wanted > room:
        raise GenerationError(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{len(ids) + max(wanted, 0)} tokens ({len(ids)} in the {param}, {max(wanted, 0)} in the completion). "
            f"Please reduce the length of the {param} or completion.",
            param=param, code="context_length_exceeded")
    return ids, wanted


class _Streamer:
    """Receives generate()'s tokens (on its thread): decodes them, cuts at a stop string, and hands the new text
    on, holding back a tail that might still become a stop string or is half a character.

    Each token costs work of its own size, not the text's: only the newest tokens are decoded (after the one or two
    before them, whose text is subtracted: a tokenizer's spacing depends on the neighbours), and a stop string is
    looked for only where it could end in the new text.
    """

    def __init__(self, tokenizer: Any, stops: list[str], out: queue.Queue) -> None:
        self.tok, self.stops, self.out = tokenizer, stops, out
        self.longest = max((len(s) for s in stops), default=0)
        self.ids: list[int] = []
        self.text = ""  # the completion's text so far (up to the last token that decoded to whole characters)
        self.prefix_at = self.read_at = 0  # ids[prefix_at:read_at]: context for decoding ids[read_at:]
        self.scanned = 0  # text[:scanned] has been searched for stop strings
        self.sent = 0
        self.stopped = False
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate() hands the prompt first
            self.prompt_seen = True
            return
        if self.stopped:
            return
        self.ids.extend(int(i) for i in value.reshape(-1).tolist())
        self._emit(final=False)

    def end(self) -> None:
        if not self.stopped:
            self._emit(final=True)
        self.out.put(_END)

    def _decode_new(self, final: bool) -> None:
        """Append the text of the tokens after ``read_at``, unless they end inside a character (until ``final``)."""
        before = self.tok.decode(self.ids[self.prefix_at:self.read_at], skip_special_tokens=True)
        now = self.tok.decode(self.ids[self.prefix_at:], skip_special_tokens=True)
        if len(now) > len(before) and (final or not now.endswith("\ufffd")):
            self.text += now[len(before):]
            self.prefix_at, self.read_at = self.read_at, len(self.ids)

    def _emit(self, final: bool) -> None:
        self._decode_new(final)
        text = self.text
        # A stop string not found before must end in the text added since.
        start = max(0, self.scanned - self.longest + 1)
        cut = min((i for i in (text.find(s, start) for s in self.stops) if i >= 0), default=-1)
        self.scanned = len(text)
        if cut >= 0:
            text, self.stopped, final = text[:cut], True, True
        safe = len(text)
        if not final:
            for s in self.stops:
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        safe = min(safe, len(text) - k)
                        break
        if safe > self.sent:
            self.out.put(text[self.sent:safe])
            self.sent = safe


def generate(loaded: Loaded, req: GenerationRequest, ids: list[int], max_new: int) -> Iterator[dict[str, Any]]:
    """Each choice's text deltas then its end (finish_reason, completion tokens), and the usage last."""
    import torch

    tok = loaded.tokenizer
    model = loaded.model
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    if tok.eos_token_id is not None:
        eos_ids.add(tok.eos_token_id)
    pad = tok.pad_token_id if tok.pad_token_id is not None else next(iter(eos_ids), 0)
    input_ids = torch.tensor([ids], device=model.device)
    sampling: dict[str, Any] = {"do_sample": False}
    if req.temperature > 0:
        sampling = {"do_sample": True, "temperature": req.temperature, "top_p": req.top_p, "top_k": 0}
    if req.seed is not None:
        torch.manual_seed(req.seed)
    total = 0
    for index in range(req.n):
        choice = _Choice(loaded, req.stop)
        yield from choice.run(index, input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                              max_new_tokens=max_new, pad_token_id=pad, eos_token_id=sorted(eos_ids) or None,
                              **sampling)
        new = choice.ids[0, len(ids):].tolist()
        while new and new[-1] == pad and pad not in eos_ids:
            new.pop()
        hit_eos = bool(new) and new[-1] in eos_ids
        reason = "stop" if choice.streamer.stopped or hit_eos or len(new) < max_new else "length"
        total += len(new)
        yield {"type": "end", "index": index, "finish_reason": reason, "completion_tokens": len(new)}
    yield {"type": "usage", "prompt_tokens": len(ids), "completion_tokens": total,
           "total_tokens": len(ids) + total}


class _Choice:
    """One completion: generate() on its own thread, its text handed over as it comes."""

    def __init__(self, loaded: Loaded, stops: list[str]) -> None:
        self.loaded = loaded
        self.out: queue.Queue = queue.Queue()
        self.streamer = _Streamer(loaded.tokenizer, stops, self.out)
        self.ids: Any = None
        self.error: BaseException | None = None

    def _work(self, kwargs: dict[str, Any]) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        streamer = self.streamer

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kw: Any) -> Any:
                return torch.full((input_ids.shape[0],), streamer.stopped, dtype=torch.bool, device=input_ids.device)

        try:
            with torch.no_grad(), self.loaded.active():
                self.ids = self.loaded.model.generate(streamer=streamer,
                                                      stopping_criteria=StoppingCriteriaList([_Stop()]), **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the consuming thread
            self.error = e
            self.out.put(_END)

    def run(self, index: int, **kwargs: Any) -> Iterator[dict[str, Any]]:
        """The choice's text deltas; afterwards ``ids`` holds prompt and completion."""
        t = threading.Thread(target=self._work, args=(kwargs,), name="generate", daemon=True)
        t.start()
        done = False
        try:
            while (piece := self.out.get()) is not _END:
                yield {"type": "delta", "index": index, "text": piece}
            done = True
        finally:
            # A consumer that went away must not leave a generation running on the shared model.
            if not done:
                self.streamer.stopped = True
            t.join()
        if self.error is not None:
            raise self.error
