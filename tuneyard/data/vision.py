"""Vision-language models in the data path: recognising one, loading its processor, and tokenising image rows.

An image row (``formats.py``: a message ``content`` that is a list of ``{"type": "text"}`` and ``{"type": "image"}``
parts) is rendered with the processor's chat template, which shows each image as the model's placeholder (Qwen2-VL:
``<|vision_start|><|image_pad|><|vision_end|>``, LLaVA: ``<image>``). The assistant spans are found exactly as for
text rows (``tokenize.ConversationEncoder``, on the processor's tokenizer); then each image's placeholder token is
repeated as many times as the processor itself expands it for that image's size
(``processor._get_num_multimodal_tokens``, or a processor call on the placeholder alone), so the ids equal what
``processor(text=..., images=...)`` gives, with no pixels decoded. Image tokens never carry loss, not even with
``train_on_input``, and are counted in the tokens of the job (``trained_tokens``).

A stored example is ``input_ids``, ``labels`` and ``images`` (the rows' image references, in order, as
``tuneyard.data.images.open_image`` reads them from the job's ``data/`` directory); the trainer's collator
(``tuneyard.trainer.vision``) runs the image processor on them batch by batch.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from tuneyard.data.tokenize import IGNORE_INDEX, ConversationEncoder, EncodeError, EncodeStats

# Where an image may appear: the model reads images in the prompt, never generates them.
IMAGE_ROLES = ("user", "system")


def is_vision_model(config_or_path: Any, *, revision: str | None = None, trust_remote_code: bool = False) -> bool:
    """True when the model (a config, or a directory / hub id to read one from) takes images as input."""
    config = config_or_path
    if isinstance(config_or_path, (str, Path)):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(config_or_path), revision=revision,
                                            trust_remote_code=trust_remote_code)
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    if getattr(config, "vision_config", None) is not None:
        return True
    return getattr(config, "model_type", None) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def load_processor(name: str, *, revision: str | None = None, trust_remote_code: bool = False,
                   max_pixels: int | None = None, min_pixels: int | None = None) -> Any:
    """The model's processor (``AutoProcessor``), with the job's pixel limits on a processor that resizes by pixels.

    Without torchvision, transformers cannot build the video processor that Qwen2-VL's processor also holds: the
    processor is then built from its image processor and tokenizer alone (images work, videos are refused).
    """
    from transformers import AutoProcessor

    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
    try:
        processor = AutoProcessor.from_pretrained(name, **kwargs)
    except Exception as e:
        processor = _image_only_processor(name, kwargs, e)
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise ValueError(f"the processor of {name} ({type(processor).__name__}) has no image processor and "
                         "tokenizer: it is not a vision-language model's")
    _apply_pixel_limits(processor.image_processor, max_pixels, min_pixels)
    return processor


def _image_only_processor(name: str, kwargs: dict[str, Any], error: Exception) -> Any:
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers import utils as hf_utils

    cls_name = _processor_class_name(name, kwargs)
    if hf_utils.is_torchvision_available() or cls_name is None:
        raise error
    import transformers

    base = getattr(transformers, cls_name)
    # The same class name, so that a processor saved from it loads back as the model's own.
    cls = type(cls_name, (base,), {"get_attributes": classmethod(
        lambda c: [a for a in base.get_attributes() if a != "video_processor"])})
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    image_processor = AutoImageProcessor.from_pretrained(name, **kwargs)
    return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template)


def _processor_class_name(name: str, kwargs: dict[str, Any]) -> str | None:
    """The processor class a directory (a base model, or a fine-tuned adapter with its processor) names."""
    import json

    from transformers.utils import cached_file

    try:
        path = cached_file(name, "processor_config.json", _raise_exceptions_for_missing_entries=False, **kwargs)
        if path:
            with open(path) as f:
                found = json.load(f).get("processor_class")
            if found:
                return found
        from transformers import AutoConfig
        from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

        return PROCESSOR_MAPPING_NAMES.get(AutoConfig.from_pretrained(name, **kwargs).model_type)
    except (OSError, ValueError):
        return None


def _apply_pixel_limits(image_processor: Any, max_pixels: int | None, min_pixels: int | None) -> None:
    if max_pixels is None and min_pixels is None:
        return
    size = getattr(image_processor, "size", None)
    # Qwen2-VL-style processors resize every image to a pixel budget (size = shortest/longest edge in pixels).
    if getattr(image_processor, "merge_size", None) is None or not isinstance(size, dict):
        return
    size = dict(size)
    if max_pixels is not None:
        size["longest_edge"] = max_pixels
    if min_pixels is not None:
        size["shortest_edge"] = min_pixels
    image_processor.size = size


def processor_template(processor: Any) -> str | None:
    """The chat template the processor renders image rows with (its own, else its tokenizer's)."""
    return getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None)


def image_token(processor: Any) -> tuple[str, int]:
    """The placeholder the processor expands per image, and its id."""
    token = getattr(processor, "image_token", None) or getattr(processor.tokenizer, "image_token", None)
    if not token:
        raise ValueError(f"{type(processor).__name__} names no image token")
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None:
        token_id = processor.tokenizer.convert_tokens_to_ids(token)
    return token, int(token_id)


def _image_path(data_dir: str | Path, ref: str) -> Path:
    root = Path(data_dir).resolve()
    path = (root / ref).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"image reference {ref!r} is outside the job's data directory")
    return path


def image_size(data_dir: str | Path, ref: str) -> tuple[int, int]:
    """(height, width) of a stored image, read from its header only."""
    from PIL import Image

    with Image.open(_image_path(data_dir, ref)) as img:
        width, height = img.size
    return height, width


class VisionEncoded(NamedTuple):
    """One tokenised image example: int32 ids and labels (image tokens expanded, never trained) and its images."""

    input_ids: np.ndarray
    labels: np.ndarray
    images: list[str]


@dataclasses.dataclass
class VisionEncoder:
    """Tokenises image rows (and text rows) for a vision-language model, a batch at a time."""

    processor: Any
    data_dir: str
    template: str | None = None
    system_prompt: str | None = None
    max_length: int = 2048
    truncation: str = "truncate"
    train_on_input: bool = False
    last_turn_only: bool = False

    def __post_init__(self) -> None:
        from tuneyard.domain.spec import MAX_LENGTH

        self.tokenizer = self.processor.tokenizer
        self.image_text, self.image_id = image_token(self.processor)
        # Lengths are checked after the images are expanded, so the text encoder keeps everything.
        self.text = ConversationEncoder(self.tokenizer, template=self.template or processor_template(self.processor),
                                        system_prompt=self.system_prompt, max_length=MAX_LENGTH,
                                        truncation="truncate", train_on_input=self.train_on_input,
                                        last_turn_only=self.last_turn_only, text_only=False)
        self._per_size: dict[tuple[int, int], int] = {}

    def encode(self, rows: list[dict], stats: EncodeStats | None = None) -> list[VisionEncoded | None]:
        """The examples of ``rows`` (None where dropped; see ``stats``); EncodeError (with ``index``) on a bad row."""
        stats = stats if stats is not None else EncodeStats()
        refs = []
        for j, row in enumerate(rows):
            try:
                refs.append(_image_refs(row))
            except EncodeError as e:
                e.index = j
                raise
        inner = EncodeStats()
        encoded = self.text.encode(rows, inner)
        stats.dropped_no_labels += inner.dropped_no_labels
        stats.segmented += inner.segmented
        stats.unlocated_turns += inner.unlocated_turns
        out: list[VisionEncoded | None] = []
        for j, (enc, images) in enumerate(zip(encoded, refs, strict=True)):
            if enc is None:
                out.append(None)
                continue
            try:
                out.append(self._finish(self._expand(enc.input_ids, enc.labels, images), stats))
            except EncodeError as e:
                e.index = j
                raise
        return out

    def _expand(self, ids: np.ndarray, labels: np.ndarray, images: list[str]) -> VisionEncoded:
        at = np.flatnonzero(ids == self.image_id)
        if len(at) != len(images):
            raise EncodeError(f"the chat template shows {len(at)} image placeholder(s) for the row's {len(images)} "
                              "image(s); use the model's own template (template: null)")
        if not images:
            return VisionEncoded(ids, labels, [])
        counts = [self._image_tokens(ref) for ref in images]
        # Each placeholder becomes `count` copies of itself (none of them trained).
        repeats = np.ones(len(ids), dtype=np.int64)
        repeats[at] = counts
        new_ids = np.repeat(ids, repeats).astype(np.int32)
        new_labels = np.repeat(labels, repeats).astype(np.int32)
        new_labels[new_ids == self.image_id] = IGNORE_INDEX
        return VisionEncoded(new_ids, new_labels, images)

    def _image_tokens(self, ref: str) -> int:
        try:
            size = image_size(self.data_dir, ref)
        except (OSError, ValueError) as e:
            raise EncodeError(f"image {ref} cannot be read: {e}") from None
        if size not in self._per_size:
            self._per_size[size] = self._tokens_for_size(size, ref)
        return self._per_size[size]

    def _tokens_for_size(self, size: tuple[int, int], ref: str) -> int:
        try:
            return int(self.processor._get_num_multimodal_tokens(image_sizes=[list(size)]).num_image_tokens[0])
        except (AttributeError, NotImplementedError, TypeError, KeyError):
            pass
        # A processor that cannot say: expand the placeholder alone for this image and count.
        from tuneyard.data.images import open_image

        out = self.processor(text=[self.image_text], images=[open_image(self.data_dir, ref)])
        return int(np.count_nonzero(np.asarray(out["input_ids"][0]) == self.image_id))

    def _finish(self, enc: VisionEncoded, stats: EncodeStats) -> VisionEncoded | None:
        if len(enc.input_ids) > self.max_length:
            last_image = int(np.flatnonzero(enc.input_ids == self.image_id)[-1]) if enc.images else -1
            trained = np.flatnonzero(enc.labels[: self.max_length] != IGNORE_INDEX)
            # An image cut in half no longer matches its features, and a row with nothing left to learn is useless.
            if self.truncation == "drop" or last_image >= self.max_length or not len(trained):
                stats.dropped_too_long += 1
                return None
            enc = VisionEncoded(enc.input_ids[: self.max_length], enc.labels[: self.max_length], enc.images)
            stats.truncated += 1
        stats.examples += 1
        stats.tokens += len(enc.input_ids)
        stats.trainable_tokens += int(np.count_nonzero(enc.labels != IGNORE_INDEX))
        return enc


def _image_refs(row: dict) -> list[str]:
    """The row's image references in the order the template shows them; EncodeError for one it cannot take."""
    refs = []
    for k, message in enumerate(row.get("messages", ()), start=1):
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            if part.get("type") != "image":
                continue
            if message.get("role") not in IMAGE_ROLES:
                raise EncodeError(f"message {k} ({message.get('role')}) holds an image: the model reads images in "
                                  "user and system messages only")
            refs.append(str(part["image"]))
    return refs


def vision_features() -> Any:
    """Columns of a tokenised image split."""
    import datasets

    return datasets.Features({"input_ids": datasets.List(datasets.Value("int32")),
                              "labels": datasets.List(datasets.Value("int32")),
                              "images": datasets.List(datasets.Value("string"))})


def vision_table(examples: list[VisionEncoded]) -> Any:
    """A table of tokenised image examples."""
    import pyarrow as pa

    from tuneyard.data.splits import encoded_table

    table = encoded_table(examples)  # type: ignore[arg-type]
    return table.append_column("images", pa.array([e.images for e in examples], type=pa.list_(pa.string())))
