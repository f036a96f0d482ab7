"""Settings a job's processes follow reach them through the spec's runtime section, not their environment."""

from __future__ import annotations

from pathlib import Path

from tuneyard.data.images import ImageRules, ImageStore
from tuneyard.service.jobs import runtime_spec
from tuneyard.settings import Settings


def test_trainer_and_image_settings_travel_in_the_spec(tmp_path, monkeypatch):
    roots = tmp_path / "data"
    roots.mkdir()
    settings = Settings(home=tmp_path / "home", dense_lm_head=False, max_image_bytes=1234, max_image_pixels=5678,
                        max_images_per_example=3, max_image_examples=7, local_roots=str(roots),
                        download_timeout_seconds=9.0)
    runtime = runtime_spec(settings)
    assert runtime.dense_lm_head is False
    # A job's process sees none of the server's variables: what it applies is the spec's.
    for name in ("TUNEYARD_MAX_IMAGE_BYTES", "TUNEYARD_LOCAL_ROOTS", "TUNEYARD_DENSE_LM_HEAD"):
        monkeypatch.delenv(name, raising=False)
    rules = ImageRules.from_settings(None, runtime)
    assert (rules.max_bytes, rules.max_pixels, rules.max_per_example, rules.max_image_examples) == (1234, 5678, 3, 7)
    assert rules.roots == (Path(roots).resolve(),)
    store = ImageStore(tmp_path / "job-data", rules, param="training_file", runtime=runtime)
    assert store.runtime.download_timeout_seconds == 9.0


def test_an_old_spec_without_the_new_fields_reads_with_the_defaults():
    from tuneyard.domain.spec import RuntimeSpec

    runtime = RuntimeSpec.model_validate({"flash_attention": False})
    assert runtime.dense_lm_head is True and runtime.max_image_bytes == 10 * 1024**2 and runtime.allowed_roots == []
