"""The inference process's model cache, in process: each base and adapter loaded at most once while kept, the
least recently used evicted past the memory budget, deleted models forgotten."""

from __future__ import annotations

import pytest

from tuneyard.domain.generation import GenerationRequest
from tuneyard.inference.cache import ModelCache
from tuneyard.inference.generate import encode, generate


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> list[str]:
    """Three random (non-zero) LoRA adapters of the tiny model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = []
    for i in range(3):
        d = tmp_path_factory.mktemp(f"adapter{i}")
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
        get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
                       ).save_pretrained(str(d))
        out.append(str(d))
    return out


def answer(cache: ModelCache, base: str, adapter: str | None) -> str:
    loaded = cache.get(base, adapter)
    req = GenerationRequest(base=base, adapter=adapter, prompt="What is the capital of Japan?", max_tokens=6,
                            temperature=0)
    ids, n = encode(loaded, req)
    return "".join(e["text"] for e in generate(loaded, req, ids, n) if e["type"] == "delta")


def test_one_base_many_adapters_each_loaded_once(tiny_model_dir, adapters):
    base = str(tiny_model_dir)
    cache = ModelCache(0)
    first = {a: answer(cache, base, a) for a in [None, *adapters]}
    again = {a: answer(cache, base, a) for a in [*reversed(adapters), None]}
    assert first == again  # switching adapters back and forth changes nothing
    assert len(set(first.values())) > 1  # and the adapters do change the answers
    assert cache.base_loads == {base: 1} and all(cache.adapter_loads[a] == 1 for a in adapters)
    assert cache.evictions == 0


def test_least_recently_used_is_evicted_past_the_budget(tiny_model_dir, adapters):
    base = str(tiny_model_dir)
    cache = ModelCache(0)
    cache.get(base, adapters[0])
    one_adapter = cache.lru[(base, adapters[0])]
    # Room for the base and two adapters, not three.
    cache.budget = cache.lru[(base, None)] + 2 * one_adapter + one_adapter // 2
    cache.get(base, adapters[1])
    cache.get(base, adapters[0])  # 0 is now more recent than 1
    cache.get(base, adapters[2])
    assert cache.evictions == 1 and cache.bytes_used <= cache.budget
    assert [a for _, a in cache.lru if a] == [adapters[0], adapters[2]]
    before = answer(cache, base, adapters[1])  # loaded again, evicting 0
    assert cache.adapter_loads[adapters[1]] == 2 and (base, adapters[0]) not in cache.lru
    assert cache.base_loads == {base: 1}
    fresh = ModelCache(0)
    assert answer(fresh, base, adapters[1]) == before


def test_forget_drops_a_deleted_model_and_the_last_adapter_gives_the_base_back(tiny_model_dir, adapters):
    base = str(tiny_model_dir)
    cache = ModelCache(0)
    bare = answer(cache, base, None)
    answer(cache, base, adapters[0])
    assert cache.forget(adapters[0] + "x") is False  # only at or under the path
    assert cache.forget(adapters[0]) is True
    assert [a for _, a in cache.lru] == [None]
    assert answer(cache, base, None) == bare
