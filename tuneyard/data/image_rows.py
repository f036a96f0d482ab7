"""Images in rows: OpenAI ``image_url`` and Llama Stack ``image`` parts, and ``images`` lists placed at the
``<image>`` tags of the messages (ms-swift, LLaMA-Factory, ShareGPT); see ``tuneyard.data.formats`` for the
internal form they become (content parts ``{"type": "image", "image": REF}``).
"""

from __future__ import annotations

from typing import Any

from tuneyard.data.rowbase import Collector, ImageSite, json_type, text_content

IMAGE_TAG = "<image>"
# Content part types that carry an image: OpenAI's image_url, Llama Stack's (and the internal form's) image.
IMAGE_PART_TYPES = ("image_url", "image")
# Row keys of media other than images (ms-swift, LLaMA-Factory): refused rather than trained on as if absent.
_OTHER_MEDIA = ("videos", "audios", "video", "audio")


def _image_ref(part: dict, ptype: str) -> tuple[str | None, str | None]:
    """(REF, None) of an OpenAI ``image_url`` part or a Llama Stack / internal ``image`` part; (None, why) else."""
    if ptype == "image_url":
        value = part.get("image_url")
        url = value.get("url") if isinstance(value, dict) else value
        if isinstance(url, str) and url.strip():
            return url.strip(), None
        return None, "'image_url.url' must be a non-empty string (an https:// URL or a data:image/...;base64, URI)"
    value = part.get("image")
    if isinstance(value, str) and value.strip():
        return value.strip(), None
    if isinstance(value, dict):
        url = value.get("url")
        url = url.get("uri") if isinstance(url, dict) else url
        if isinstance(url, str) and url.strip():
            return url.strip(), None
        data = value.get("data")
        if isinstance(data, str) and data.strip():
            # Llama Stack gives the bare base64: the image's bytes, not a declared type, say what it is.
            return "data:;base64," + data.strip(), None
    return None, "'image' must be a path or URL, {'url': {'uri': ...}} or {'data': base64}"


def message_content(value: Any, c: Collector, where: str, param: str, key: str, role: str) -> str | list[dict] | None:
    """A message's content: a string (text-only, as today) or, when it holds an image, a list of parts."""
    if isinstance(value, dict) and value.get("type") is not None:
        # Llama Stack's content may be a single part object.
        value = [value]
    if not (isinstance(value, list) and any(isinstance(p, dict) and p.get("type") in IMAGE_PART_TYPES
                                            for p in value)):
        return text_content(value, c, where, param, key)
    parts: list[dict] = []
    ok = True
    for j, part in enumerate(value):
        pwhere, pparam = f"{where}, content part {j + 1}", f"{param}[{j}]"
        if isinstance(part, str):
            parts.append({"type": "text", "text": part})
            continue
        if not isinstance(part, dict):
            c.add(f"must be an object, got {json_type(part)}", pwhere, pparam)
            ok = False
            continue
        ptype = part.get("type") or "text"
        if ptype == "text":
            if not isinstance(part.get("text"), str):
                c.add(f"'text' must be a string, got {json_type(part.get('text'))}", pwhere, f"{pparam}.text")
                ok = False
            elif part["text"]:
                parts.append({"type": "text", "text": part["text"]})
            continue
        if ptype not in IMAGE_PART_TYPES:
            c.add(f"unsupported type '{ptype}' (text, image_url and image parts are supported)", pwhere,
                  f"{pparam}.type")
            ok = False
            continue
        if role == "assistant":
            c.add("an image in an assistant message: images go in user or system messages (the models trained "
                  "here read images, they do not write them)", pwhere, pparam)
            ok = False
            continue
        detail = part.get("image_url", {}).get("detail") if isinstance(part.get("image_url"), dict) else None
        if detail not in (None, "auto"):
            # Honouring it would need a pixel budget per image; the job-wide one is vision.max_pixels.
            c.add(f"'detail' '{detail}' is not supported (only 'auto'); set the job's vision max_pixels to bound "
                  "image sizes", pwhere, f"{pparam}.image_url.detail")
            ok = False
            continue
        ref, why = _image_ref(part, ptype)
        if ref is None:
            c.add(why or "not an image", pwhere, pparam)
            ok = False
            continue
        parts.append({"type": "image", "image": ref})
        c.sites.append(ImageSite(ref, pwhere, pparam))
    return parts if ok else None


def has_images(row: dict) -> bool:
    """Whether an internal-form row holds an image part (an *image row*)."""
    return any(isinstance(m.get("content"), list) for key in ("messages", "prompt", "chosen", "rejected")
               for m in row.get(key) or ())


def image_refs(row: dict) -> list[str]:
    """The REFs of an internal-form row's image parts, in order."""
    return [p["image"] for key in ("messages", "prompt", "chosen", "rejected") for m in row.get(key) or ()
            if isinstance(m.get("content"), list) for p in m["content"] if p.get("type") == "image"]


def _listed_image(item: Any) -> str | None:
    """One entry of an ``images`` list: a path/URL string, ``{"path"|"url": ...}`` or ``{"bytes": ...}`` (the
    Hugging Face Image feature, as Parquet holds it)."""
    if isinstance(item, str) and item.strip():
        return item.strip()
    if isinstance(item, dict):
        raw = item.get("bytes")
        if isinstance(raw, bytes | bytearray) and raw:
            import base64

            return "data:;base64," + base64.b64encode(raw).decode("ascii")
        for k in ("path", "url", "image"):
            if isinstance(item.get(k), str) and item[k].strip():
                return item[k].strip()
    return None


def place_images(row: dict, out: dict, c: Collector) -> None:
    """Put an ``images`` list (ms-swift, LLaMA-Factory, ShareGPT) where the ``<image>`` tags of the messages are."""
    for key in _OTHER_MEDIA:
        if row.get(key):
            c.add(f"'{key}' are not supported: tuneyard trains on text and images only", None, key)
    images = row.get("images")
    if images is None:
        c.raise_if_any()
        return
    if isinstance(images, str | dict):
        # One image given bare (a CSV cell holding a path, say).
        images = [images]
    if not isinstance(images, list):
        c.add(f"'images' must be a list of image paths, URLs or data URIs, got {json_type(images)}", None, "images")
        c.raise_if_any()
    refs = []
    for k, item in enumerate(images):
        ref = _listed_image(item)
        if ref is None:
            c.add("must be a path, a URL, a data URI, or an object with 'path' or 'bytes'", f"images[{k}]",
                  f"images[{k}]")
        refs.append(ref)
    groups = [out.get(key) or [] for key in ("messages", "prompt", "chosen", "rejected")]
    if not any(groups) and refs:
        c.add("'images' needs a conversation to place them in; this row has none", None, "images")
    tags = 0
    for group in groups:
        for i, m in enumerate(group):
            n = m["content"].count(IMAGE_TAG) if isinstance(m.get("content"), str) else 0
            if n and m["role"] == "assistant":
                c.add(f"an '{IMAGE_TAG}' tag in an assistant message: images go in user or system messages",
                      f"message {i + 1}", None)
            tags += n
    if tags != len(refs):
        c.add(f"the row has {tags} '{IMAGE_TAG}' tag(s) but {len(refs)} image(s) in 'images'; each image needs "
              "one tag where it goes in the conversation", None, "images")
    c.raise_if_any()
    k = 0
    for group in groups:
        for m in group:
            if not (isinstance(m.get("content"), str) and IMAGE_TAG in m["content"]):
                continue
            pieces = m["content"].split(IMAGE_TAG)
            parts: list[dict] = []
            for idx, piece in enumerate(pieces):
                if piece:
                    parts.append({"type": "text", "text": piece})
                if idx < len(pieces) - 1:
                    parts.append({"type": "image", "image": refs[k]})
                    c.sites.append(ImageSite(refs[k], f"images[{k}]", f"images[{k}]"))
                    k += 1
            m["content"] = parts
