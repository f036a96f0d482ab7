"""The tokenised-data cache: a second prepare of the same data reuses the tokens; any change misses."""

from __future__ import annotations

from tests.unit.test_data_prepare import make_job
from tuneyard.data.prepare import run
from tuneyard.data.splits import load_split
from tuneyard.demo.tiny import write_sample_jsonl
from tuneyard.domain.spec import SplitSpec
from tuneyard.jobdir import iter_events, read_json


def _reused(job) -> bool:
    return any(e.message.startswith("Reused the tokenised data") for e in iter_events(job.events))


def test_second_prepare_reuses_the_tokens_and_changes_miss(tmp_path, tiny_model_dir, monkeypatch):

    from tuneyard.settings import get_settings

    monkeypatch.setenv("TUNEYARD_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    try:
        train = write_sample_jsonl(tmp_path / "train.jsonl", repeat=2)
        split = SplitSpec(type="random", validation_ratio=0.25)
        first = make_job(tmp_path / "a", tiny_model_dir, train, split=split)
        assert run(first.root) == 0 and not _reused(first)
        second = make_job(tmp_path / "b", tiny_model_dir, train, split=split)
        assert run(second.root) == 0 and _reused(second)
        a, b = read_json(first.prepared), read_json(second.prepared)
        assert a == b  # same counts, tokens and steps
        for split_name in ("train", "validation"):
            x = load_split(first.data / split_name)
            y = load_split(second.data / split_name)
            assert x["input_ids"] == y["input_ids"] and x["labels"] == y["labels"]
        # Anything that changes the tokens is another key.
        for name, kwargs in (("len", {"max_length": 64}), ("sys", {"system_prompt": "Be brief."}),
                             ("seq", {"split": SplitSpec(type="sequential", validation_ratio=0.25)})):
            job = make_job(tmp_path / name, tiny_model_dir, train, **({"split": split} | kwargs))
            assert run(job.root) == 0 and not _reused(job), name
        other = write_sample_jsonl(tmp_path / "other.jsonl", repeat=3)
        job = make_job(tmp_path / "data", tiny_model_dir, other, split=split)
        assert run(job.root) == 0 and not _reused(job)
        assert list((tmp_path / "home" / "cache" / "tokenised").iterdir())
    finally:
        get_settings.cache_clear()


def test_cache_is_bounded(tmp_path):
    from tuneyard.data.cache import TokenisedCache

    src = tmp_path / "src" / "train"
    src.mkdir(parents=True)
    (src / "data.arrow").write_bytes(b"x" * 1000)
    cache = TokenisedCache(tmp_path / "cache", max_bytes=2500)
    for key in ("k1", "k2", "k3"):
        cache.store(key, tmp_path / "src", ["train"], {"n_train": 1})
    kept = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert kept == ["k2", "k3"]  # the least recently used went
    assert cache.fetch("k2", tmp_path / "job") == {"n_train": 1, "splits": ["train"],
                                                   "created_at": cache.fetch("k2", tmp_path / "job2")["created_at"]}
    assert cache.fetch("k1", tmp_path / "job3") is None
