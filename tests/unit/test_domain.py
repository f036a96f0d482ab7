"""The job model's rules: state transitions, naming, and how "auto" hyperparameters resolve."""

from __future__ import annotations

import pytest

from tuneyard.domain.errors import Conflict, InvalidRequest
from tuneyard.domain.hparams import auto_batch_size, auto_epochs, micro_batching, resolve, total_steps
from tuneyard.domain.jobs import JobStatus, check_transition, fine_tuned_model_name, sources_of
from tuneyard.domain.spec import TrainingSpec

S = JobStatus


def spec(**over) -> TrainingSpec:
    return TrainingSpec.model_validate({"model": {"name": "org/base"}, "data": {"train": {"path": "/d.jsonl"}},
                                        **over})


@pytest.mark.parametrize("src,dst", [(S.VALIDATING_FILES, S.QUEUED), (S.QUEUED, S.RUNNING),
                                     (S.RUNNING, S.SUCCEEDED), (S.RUNNING, S.PAUSED), (S.PAUSED, S.QUEUED),
                                     (S.RUNNING, S.CANCELLED), (S.VALIDATING_FILES, S.FAILED)])
def test_allowed_transitions(src, dst):
    check_transition(src, dst)
    assert src in sources_of(dst)


@pytest.mark.parametrize("src,dst", [(S.SUCCEEDED, S.RUNNING), (S.CANCELLED, S.QUEUED), (S.FAILED, S.SUCCEEDED),
                                     (S.QUEUED, S.SUCCEEDED), (S.SUCCEEDED, S.CANCELLED)])
def test_forbidden_transitions(src, dst):
    with pytest.raises(Conflict):
        check_transition(src, dst)


def test_terminal_states_lead_nowhere():
    for terminal in (S.SUCCEEDED, S.FAILED, S.CANCELLED):
        assert all(terminal not in sources_of(t) for t in S)


def test_fine_tuned_model_name():
    assert fine_tuned_model_name("org/base", "acme", "demo", "ftjob-abc") == "ft:org/base:acme:demo:abc"
    assert fine_tuned_model_name("/models/my-base/", "acme", None, "ftjob-abc") == "ft:my-base:acme::abc"
    assert fine_tuned_model_name("/models/a:b", "acme", None, "ftjob-abc") == "ft:a-b:acme::abc"


@pytest.mark.parametrize("parent", ["ft:org/base:acme:sft:abc", "ft:org/base:acme::abc:ckpt-step-7",
                                    "ft:org/base:other:x:y"])
def test_a_continued_model_keeps_its_original_base_in_its_name(parent):
    # OpenAI's convention: the name stays ft:<base>:<org>:<suffix>:<id>; the job's model names the parent.
    assert fine_tuned_model_name(parent, "acme", "dpo", "ftjob-def") == "ft:org/base:acme:dpo:def"


def test_auto_epochs_follows_the_openai_rule():
    assert auto_epochs(10) == 10  # at least 100 examples seen in all
    assert auto_epochs(2) == 25  # ... but never more than 25 epochs
    assert auto_epochs(500) == 3
    assert auto_epochs(20_000) == 1  # at most 25,000 examples seen


@pytest.mark.parametrize("n,batch", [(1, 1), (500, 1), (1000, 2), (4000, 8), (10**7, 256)])
def test_auto_batch_size(n, batch):
    assert auto_batch_size(n) == batch


def test_resolve_fills_every_auto_and_counts_steps():
    r = resolve(spec(), 500)
    hp = r.hyperparameters
    assert (hp.n_epochs, hp.batch_size, hp.learning_rate) == (3, 1, 2e-4) and r.is_resolved()
    assert total_steps(r, 500) == 1500
    full = resolve(spec(adapter={"type": "full"}, hyperparameters={"learning_rate_multiplier": 2.0}), 500)
    assert full.hyperparameters.learning_rate == pytest.approx(4e-5)


def test_auto_batch_divides_across_ranks():
    r = resolve(spec(resources={"nproc_per_node": 2}, hyperparameters={"batch_size": "auto"}), 3000)
    assert r.hyperparameters.batch_size % 2 == 0


def test_micro_batching_keeps_the_global_batch():
    assert micro_batching(32, 2, None, None) == (8, 2)
    assert micro_batching(6, 1, None, None) == (6, 1)
    assert micro_batching(8, 2, 2, None) == (2, 2)
    with pytest.raises(InvalidRequest, match="multiple of the 2 training processes"):
        micro_batching(5, 2, None, None)
    with pytest.raises(InvalidRequest, match="batch_size 8 != per_device_batch_size 2"):
        micro_batching(8, 1, 2, 2)


def test_quantised_full_fine_tune_is_refused():
    with pytest.raises(ValueError, match="QLoRA"):
        spec(model={"name": "m", "quant_bits": 4}, adapter={"type": "full"})


def test_problems_are_collected_and_raised_as_one():
    from tuneyard.domain.errors import InvalidRequest, NotFound, Problems

    problems = Problems()
    with problems.check():
        raise NotFound("organisation 'x' not found", param="org", code="org_not_found")
    with problems.check():
        pass
    inner = Problems()
    inner.add(InvalidRequest("node_count 2: one node only", param="node_count"))
    inner.add(InvalidRequest("a GPU was asked for", param="device"))
    with problems.check():
        inner.raise_if_any()
    with pytest.raises(InvalidRequest) as e:
        problems.raise_if_any()
    err = e.value
    # Nested collections flatten; several problems are a 400 with the first one's field and code.
    assert err.status_code == 400 and (err.param, err.code) == ("org", "org_not_found")
    assert [p.param for p in err.problems] == ["org", "node_count", "device"]
    assert err.message == ("3 problems: org: organisation 'x' not found; node_count 2: one node only; "
                           "device: a GPU was asked for.")
    # A dialect's names reach every problem and the message.
    err.rename_params({"device": "infra_config.gpu_type", "node_count": "infra_config.node_count"})
    assert [p.param for p in err.problems] == ["org", "infra_config.node_count", "infra_config.gpu_type"]
    assert "infra_config.gpu_type: a GPU was asked for" in err.message


def test_a_single_problem_keeps_its_own_error():
    from tuneyard.domain.errors import NotFound, Problems

    problems = Problems()
    problems.raise_if_any()  # nothing found: nothing raised
    with problems.check():
        raise NotFound("organisation 'x' not found", param="org")
    with pytest.raises(NotFound) as e:
        problems.raise_if_any()
    assert e.value.status_code == 404 and e.value.message == "organisation 'x' not found"
    e.value.rename_params({"org": "org_id"})
    assert e.value.problems[0].param == "org_id" and e.value.message == "organisation 'x' not found"
