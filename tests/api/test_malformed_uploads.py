"""Every file of the malformed corpus, uploaded with the `openai` SDK to a real server, is refused with a 400
whose OpenAI error body carries the file's line-numbered messages, and nothing is stored.

The server runs without a worker; the problems only the model's tokenizer can find are in
tests/integration/test_data_failures.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

from tests.conftest import Server

CORPUS = Path(__file__).resolve().parents[1] / "data" / "malformed"
EXPECTED: dict[str, dict] = json.loads((CORPUS / "expected.json").read_text())


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("malformed-home"), {"TUNEYARD_RUN_WORKER": "false"})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(api):
    return api.openai(api.key("acme"))


def stored_files(api) -> list[Path]:
    """Every file the server keeps on disk for uploads."""
    root = api.home / "files"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_malformed_upload_is_refused_with_its_messages(api, client, name):
    entry = EXPECTED[name]
    before_ids = [f.id for f in client.files.list()]
    before_disk = stored_files(api)
    if entry.get("upload") == "accepted":
        # Only a job's own minimum refuses it (min_examples is the job's, not the upload's).
        f = client.files.create(file=(CORPUS / name).open("rb"), purpose="fine-tune")
        assert f.status == "processed"
        client.files.delete(f.id)
        return
    with pytest.raises(openai.BadRequestError) as e:
        client.files.create(file=(CORPUS / name).open("rb"), purpose="fine-tune")
    body = e.value.body
    assert e.value.status_code == 400
    assert body["param"] == "file" and body["code"] == "invalid_file_format"
    assert body["type"] == "invalid_request_error"
    assert body["message"].startswith(f"Invalid file format for fine-tuning ('{name}'): ")
    for message in entry["errors"]:
        assert message in body["message"], (message, body["message"])
    # Nothing was kept: not in the listing, not on disk.
    assert [f.id for f in client.files.list()] == before_ids
    assert stored_files(api) == before_disk


def test_good_files_in_every_container_are_accepted(api, client, tmp_path):
    """The containers the corpus breaks are accepted when well formed (uploads keep their suffix)."""
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"A{i}"}]}
            for i in range(3)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "a.json").write_text(json.dumps(rows))
    with (tmp_path / "a.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["messages"], *[[json.dumps(r["messages"])] for r in rows]])
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    dpo = {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."}
    (tmp_path / "pref.jsonl").write_text(json.dumps(dpo) + "\n")
    for name in ("a.jsonl", "a.json", "a.csv", "a.parquet", "pref.jsonl"):
        f = client.files.create(file=(tmp_path / name).open("rb"), purpose="fine-tune")
        assert f.status == "processed" and f.filename == name
        assert client.files.content(f.id).read() == (tmp_path / name).read_bytes()
    # Kept under their container's suffix, so that prepare reads a CSV as CSV later.
    assert {p.suffix for p in stored_files(api)} >= {".jsonl", ".json", ".csv", ".parquet"}


def test_image_rows_are_accepted_at_upload_and_a_bad_image_refused(client, tmp_path):
    """OpenAI vision rows (a data URI, an https URL the server does not fetch) and ms-swift rows with <image> tags."""
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(buf, format="PNG")
    red = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    rows = [{"messages": [{"role": "user", "content": [{"type": "text", "text": "What colour is this?"},
                                                       {"type": "image_url", "image_url": {"url": url}}]},
                          {"role": "assistant", "content": "Red."}]} for url in (red, "https://example.com/red.png")]
    rows.append({"messages": [{"role": "user", "content": "<image>What colour is this?"},
                              {"role": "assistant", "content": "Red."}], "images": [red]})
    good = tmp_path / "vision.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    f = client.files.create(file=good.open("rb"), purpose="fine-tune")
    assert f.status == "processed"
    client.files.delete(f.id)
    rows[1]["messages"][0]["content"][1]["image_url"]["url"] = "cat.png"
    bad = tmp_path / "relative.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(openai.BadRequestError) as e:
        client.files.create(file=bad.open("rb"), purpose="fine-tune")
    assert "Example 2, message 1, content part 2: image 'cat.png' is a relative path" in e.value.body["message"]
