"""The inference process's streamer, fed token by token as generate() feeds it, on the tiny model's real tokenizer:
its text is the whole completion's decode, cut at the first stop string as a search of the whole text would cut it,
and each token costs decoding a few tokens, not the text so far."""

from __future__ import annotations

import queue

import pytest
import torch

from tuneyard.inference.generate import _END, _Streamer

TEXTS = ["Paris is the capital of France. Tokyo is the capital of Japan.",
         "Die Hauptstadt ist Zürich? Nein: Bern, « naïve » café, 東京 and 🙂🙂 too.\nNew line, spaces  here."]


class Counting:
    """The real tokenizer, recording how many ids each decode is given."""

    def __init__(self, tok) -> None:
        self.tok, self.sizes = tok, []

    def decode(self, ids, **kw):
        self.sizes.append(len(ids))
        return self.tok.decode(ids, **kw)


def stream(tok, ids: list[int], stops: list[str]) -> tuple[list[str], _Streamer]:
    out: queue.Queue = queue.Queue()
    st = _Streamer(tok, stops, out)
    st.put(torch.tensor([[1, 2, 3]]))  # the prompt, which generate() hands over first
    for i in ids:
        if st.stopped:
            break
        st.put(torch.tensor([i]))
    st.end()
    pieces = []
    while (p := out.get_nowait()) is not _END:
        pieces.append(p)
    return pieces, st


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_is_the_whole_decode(tiny_tokenizer, text):
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    counting = Counting(tiny_tokenizer)
    pieces, _ = stream(counting, ids, [])
    assert "".join(pieces) == tiny_tokenizer.decode(ids, skip_special_tokens=True)
    assert "\ufffd" not in "".join(pieces)
    # The window decoded per token stays small however long the text grows.
    assert max(counting.sizes) <= 8 and len(counting.sizes) <= 2 * len(ids) + 2


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("stop", ["capital", "e c", ".", "\n", "🙂", "nowhere in it", "Japan."])
def test_stop_strings_cut_where_the_whole_text_would(tiny_tokenizer, text, stop):
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    whole = tiny_tokenizer.decode(ids, skip_special_tokens=True)
    pieces, st = stream(tiny_tokenizer, ids, [stop, "zzz-never"])
    want = whole[:whole.find(stop)] if stop in whole else whole
    assert "".join(pieces) == want
    assert st.stopped is (stop in whole)
