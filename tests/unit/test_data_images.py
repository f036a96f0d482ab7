"""Image rows (issue 15): each row format's images become content parts; the API-side checks read headers only;
the prepare step's store fetches each image once (https, s3 with the job's secret), decodes, resizes and keeps it
content-addressed. Every picture is a tiny solid colour made here with Pillow."""

from __future__ import annotations

import base64
import http.server
import io
import json
import threading
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from tuneyard.data.formats import RowError, convert_row, has_images, image_refs
from tuneyard.data.images import (
    ImageError,
    ImageRules,
    ImageStore,
    fit_pixels,
    open_image,
    rewrite_refs,
)
from tuneyard.data.validate import validate_file


def picture(fmt: str = "PNG", size: tuple[int, int] = (8, 6), colour: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def rules(tmp_path: Path, **kw) -> ImageRules:
    base = {"base": str(tmp_path), "roots": (tmp_path.resolve(),), "max_bytes": 10 * 2**20, "max_pixels": 2**24,
            "max_per_example": 10, "max_image_examples": 50_000}
    return ImageRules(**{**base, **kw})


def vision(*refs: str) -> dict:
    parts = [{"type": "text", "text": "What colour is this?"}] + [
        {"type": "image_url", "image_url": {"url": r}} for r in refs]
    return {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": "Red."}]}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----- row formats ----------------------------------------------------------------------------------------


def test_every_row_format_with_images_becomes_content_parts():
    parts = [{"type": "image", "image": "a.png"}, {"type": "text", "text": "What colour?"}]
    swift = {"messages": [{"role": "user", "content": "<image>What colour?"}, {"role": "assistant", "content": "Red"}],
             "images": ["a.png"]}
    sharegpt = {"conversations": [{"from": "human", "value": "<image>What colour?"}, {"from": "gpt", "value": "Red"}],
                "images": [{"path": "a.png"}]}
    alpaca = {"instruction": "<image>What colour?", "output": "Red", "images": ["a.png"]}
    for row in (swift, sharegpt, alpaca):
        out = convert_row(row)
        assert out["messages"][0]["content"] == parts and out["messages"][1]["content"] == "Red"
        assert has_images(out) and image_refs(out) == ["a.png"]
    openai = convert_row(vision("https://example.com/a.png"))
    assert openai["messages"][0]["content"][1] == {"type": "image", "image": "https://example.com/a.png"}
    # Llama Stack: {"url": {"uri"}} or bare base64 data, a single part object or a list.
    dialog = convert_row({"dialog": [{"role": "user", "content": {"type": "image", "image": {"data": "iVBORw0K"}}},
                                     {"role": "user", "content": [{"type": "image",
                                                                   "image": {"url": {"uri": "s3://b/k.png"}}}]},
                                     {"role": "assistant", "content": "Red"}]})
    assert image_refs(dialog) == ["data:;base64,iVBORw0K", "s3://b/k.png"]
    # Parquet rows of the Hugging Face Image feature carry the bytes.
    hf = convert_row({**swift, "images": [{"bytes": b"\x89PNG", "path": None}]})
    assert image_refs(hf) == ["data:;base64," + base64.b64encode(b"\x89PNG").decode()]
    # Text rows keep string content, exactly as before.
    text = convert_row({"messages": [{"role": "user", "content": "Hi <image>"}, {"role": "assistant", "content": "x"}]})
    assert text["messages"][0]["content"] == "Hi <image>" and not has_images(text)


def test_image_row_problems_name_the_part():
    with pytest.raises(RowError) as e:
        convert_row({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x",
                                                                                                    "detail": "low"}}]},
                                  {"role": "assistant", "content": "Red"}]})
    assert [(p.where, p.param) for p in e.value.problems] == [("message 1, content part 1",
                                                               "messages[0].content[0].image_url.detail")]
    with pytest.raises(RowError) as e:
        convert_row({"messages": [{"role": "user", "content": "<image>"},
                                  {"role": "assistant", "content": "<image>"}], "images": ["a.png", "b.png"]})
    assert "an '<image>' tag in an assistant message" in str(e.value)


# ----- checks in the API process ----------------------------------------------------------------------------


def test_validation_reads_headers_only_and_resolves_paths(tmp_path, monkeypatch):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "blue.jpg").write_bytes(picture("JPEG", colour="blue"))
    rows = [vision(uri(picture())), vision(uri(picture("GIF"), "image/gif")), vision(uri(picture("WEBP"))),
            vision("img/blue.jpg"), vision(str(tmp_path / "img" / "blue.jpg")), vision("https://example.com/r.png")]
    path = write_jsonl(tmp_path / "train.jsonl", rows)

    def no_decoding(self, *a, **k):
        raise AssertionError("pixels decoded in the API process")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    monkeypatch.setattr(Image.Image, "load", no_decoding)
    report = validate_file(path, images=rules(tmp_path))
    assert report.ok, report.errors
    assert (report.n_image_examples, report.n_images) == (6, 6)


def test_csv_and_parquet_rows_carry_images(tmp_path):
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "red.png").write_bytes(picture())
    msgs = json.dumps([{"role": "user", "content": "<image>What colour?"}, {"role": "assistant", "content": "Red"}])
    with (tmp_path / "t.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["messages", "images"], [msgs, '["red.png"]'], [msgs, "red.png"]])
    report = validate_file(tmp_path / "t.csv", images=rules(tmp_path))
    assert report.ok and report.n_images == 2, report.errors
    # The Hugging Face Image feature: {"bytes", "path"} structs.
    pq.write_table(pa.Table.from_pylist([{"messages": json.loads(msgs), "images": [{"bytes": picture(), "path": None}]},
                                         {"messages": json.loads(msgs), "images": [{"bytes": b"junk", "path": None}]}]),
                   tmp_path / "t.parquet")
    report = validate_file(tmp_path / "t.parquet", images=rules(tmp_path))
    assert report.n_images == 2 and [e["line"] for e in report.errors] == [2]
    assert report.errors[0]["message"].startswith("Example 2, images[0]: image 'data:;base64,...' is not a readable")


def test_paths_escaping_the_roots_and_relative_paths_in_uploads_are_refused(tmp_path):
    inside = tmp_path / "data"
    inside.mkdir()
    (tmp_path / "secret.png").write_bytes(picture())
    path = write_jsonl(inside / "train.jsonl", [vision("../secret.png"), vision("missing.png")])
    report = validate_file(path, images=rules(inside, roots=(inside.resolve(),)))
    messages = [e["message"] for e in report.errors]
    assert "Example 1, message 1, content part 2: image '../secret.png' (" in messages[0]
    assert messages[0].endswith("is outside the allowed local roots; set TUNEYARD_LOCAL_ROOTS to allow it")
    assert messages[1].startswith("Example 2, message 1, content part 2: image 'missing.png' (") and \
        messages[1].endswith("does not exist")
    upload = validate_file(path, images=rules(inside, base=None))
    assert "an uploaded file has no directory" in upload.errors[0]["message"]


def test_remote_images_are_checked_for_form_only(tmp_path):
    refs = ["https://example.com/ok.png", "http://example.com/a.png", "https://u:secret@example.com/a.png?sig=k",
            "hf://org/images", "s3://B/k"]
    report = validate_file(write_jsonl(tmp_path / "t.jsonl", [vision(r) for r in refs]), images=rules(tmp_path))
    messages = [e["message"] for e in report.errors]
    assert [e["line"] for e in report.errors] == [2, 3, 4, 5]
    assert "plain http:// is accepted only from this machine" in messages[0]
    assert "credentials in the URL are refused" in messages[1] and "secret" not in messages[1].replace(
        "as a secret", "") and "sig=k" not in messages[1]
    assert "'hf://' is not a supported image source" in messages[2]
    assert "is not an s3://bucket/key URI" in messages[3]


def test_the_byte_limit_comes_from_the_setting(tmp_path, monkeypatch):
    from tuneyard.settings import get_settings

    path = write_jsonl(tmp_path / "train.jsonl", [vision(uri(picture(size=(32, 32))))])
    monkeypatch.setenv("TUNEYARD_MAX_IMAGE_BYTES", "40")
    monkeypatch.setenv("TUNEYARD_LOCAL_ROOTS", str(tmp_path))
    get_settings.cache_clear()
    try:
        assert ImageRules.from_settings(None).max_bytes == 40
        report = validate_file(path)
    finally:
        get_settings.cache_clear()
    assert "over the 40 byte limit (TUNEYARD_MAX_IMAGE_BYTES)" in report.errors[0]["message"]
    assert report.errors[0]["param"] == "messages[0].content[1]"


# ----- the prepare step's store ---------------------------------------------------------------------------


def test_the_store_keeps_each_image_once_resized_and_reopens_it(tmp_path):
    src = tmp_path / "red.png"
    src.write_bytes(picture(size=(40, 10)))
    store = ImageStore(tmp_path / "data", rules(tmp_path), param="training_file", max_pixels=100)
    a = store.put("red.png")
    assert store.put(str(src)) == a
    assert store.put(uri(src.read_bytes())) == a  # the same picture, inline: stored once
    gif = store.put(uri(picture("GIF", colour="lime"), "image/gif"))
    assert a.startswith("images/") and a.endswith(".png") and gif.endswith(".png") and gif != a
    with Image.open(tmp_path / "data" / a) as im:
        assert im.size == fit_pixels(40, 10, 100, None) == (20, 5)
    assert open_image(tmp_path / "data", gif).getpixel((0, 0)) == (0, 255, 0)
    assert fit_pixels(4, 4, None, 64) == (8, 8)
    store.save_index()
    # A prepare step run again finds the stored image without reading the source.
    src.unlink()
    again = ImageStore(tmp_path / "data", rules(tmp_path), param="training_file", max_pixels=100)
    assert again.put("red.png") == a
    row = rewrite_refs(convert_row(vision("red.png")), {"red.png": a})
    assert image_refs(row) == [a]
    with pytest.raises(ValueError):
        open_image(tmp_path / "data", "../red.png")


def test_pixels_that_do_not_decode_are_caught_by_the_store(tmp_path):
    # Structure intact (chunks and CRCs fine) but the compressed pixels are garbage: only decoding finds it.
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    bad = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", b"not zlib") + chunk(b"IEND", b""))
    assert validate_file(write_jsonl(tmp_path / "t.jsonl", [vision(uri(bad))]), images=rules(tmp_path)).ok
    with pytest.raises(ImageError, match="does not decode"):
        ImageStore(tmp_path / "data", rules(tmp_path), param="training_file").put(uri(bad))


@pytest.fixture()
def image_server():
    hits: list[str] = []
    red = picture()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 -- http.server's name
            hits.append(self.path)
            body = red if self.path == "/red.png" else red * 100
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", hits
    httpd.shutdown()
    httpd.server_close()


def test_https_images_are_downloaded_once_within_the_image_limit(tmp_path, image_server):
    url, hits = image_server
    store = ImageStore(tmp_path / "data", rules(tmp_path, max_bytes=len(picture()) * 10), param="training_file")
    first = store.put(f"{url}/red.png")
    assert store.put(f"{url}/red.png") == first and hits == ["/red.png"] and store.n_fetched == 1
    # Relative to a dataset fetched from a URL: beside it.
    beside = ImageStore(tmp_path / "data2", rules(tmp_path, base=f"{url}/ds/"), param="training_file")
    beside.put("../red.png")
    assert hits[-1] == "/red.png"
    with pytest.raises(ImageError, match=r"TUNEYARD_MAX_IMAGE_BYTES"):
        store.put(f"{url}/big.png")
    assert not list((tmp_path / "data" / "images").glob(".fetch-*"))


def test_prepare_refuses_image_rows_for_a_text_model_and_tokenises_them_for_a_vision_one(
        tmp_path, tiny_model_dir, tiny_qwen2_vl_dir, monkeypatch):
    from tuneyard.data.prepare import run
    from tuneyard.data.splits import load_split
    from tuneyard.domain.spec import DataSource, DataSpec, ModelSpec, TrainingSpec
    from tuneyard.jobdir import JobDir, iter_events, read_json
    from tuneyard.service.jobs import runtime_spec
    from tuneyard.settings import get_settings

    monkeypatch.setenv("TUNEYARD_LOCAL_ROOTS", str(tmp_path))
    monkeypatch.setenv("TUNEYARD_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    (tmp_path / "red.png").write_bytes(picture(size=(28, 28)))
    rows = [vision("red.png"), vision(uri(picture(size=(28, 28), colour="blue"))), vision("red.png"),
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    vlm = tiny_qwen2_vl_dir
    results = {}

    def prepare(name: str, model: Path) -> None:
        # The settings a job's process follows come in its spec (the tokenised cache under TUNEYARD_HOME).
        spec = TrainingSpec(model=ModelSpec(name=str(model), source="local"),
                            data=DataSpec(train=DataSource(path=str(data))), runtime=runtime_spec(get_settings()))
        job = JobDir(tmp_path / f"job-{name}").create()
        job.spec.write_text(spec.model_dump_json())
        assert run(job.root) == 0
        results[name] = (read_json(job.prepared), job)

    try:
        prepare("text", tiny_model_dir)
        prepare("vision", vlm)
        # The same data again: the tokenised split is reused; a source image that changed is not.
        prepare("again", vlm)
        (tmp_path / "red.png").write_bytes(picture(size=(28, 28), colour="green"))
        prepare("changed", vlm)
    finally:
        get_settings.cache_clear()
    reused = {name: any(e.message.startswith("Reused the tokenised data") for e in iter_events(job.events))
              for name, (_, job) in results.items() if name != "text"}
    assert reused == {"vision": False, "again": True, "changed": False}
    for name in ("again", "changed"):
        job = results[name][1]
        assert all((job.data / r).is_file() for rs in load_split(job.data / "train")["images"] for r in rs)
    text, _ = results["text"]
    assert text["ok"] is False and text["error"]["code"] == "model_not_vision"
    assert "takes text only" in text["error"]["message"] and text["error"]["param"] == "model"
    prepared, job = results["vision"]
    assert prepared["ok"] is True, prepared
    stored = sorted(p.name for p in (job.data / "images").glob("*.png"))
    assert len(stored) == 2  # red.png named twice is kept once
    split = load_split(job.data / "train")
    refs = [r for rs in split["images"] for r in rs]
    assert len(refs) == 3 and {r.removeprefix("images/") for r in refs} == set(stored)
    assert sorted(len(rs) for rs in split["images"]) == [0, 1, 1, 1]
    assert prepared["train_tokens"] == sum(len(ids) for ids in split["input_ids"])
