"""Remote sources against real endpoints on loopback: moto's S3 server (IAM-checked), an HTTP server, hub-style
directories; the submit-time checks of URIs and their secrets; credentials reaching the prepare process only."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_data_images import picture
from tuneyard.data.sources import (
    CREDENTIALS_ENV,
    SourceError,
    check_uri,
    display_uri,
    hub_local_dir,
    materialise,
    parse_hub,
)
from tuneyard.data.validate import detect_container
from tuneyard.demo.tiny import sample_rows
from tuneyard.domain.errors import InvalidRequest
from tuneyard.domain.spec import DataSource, TrainingSpec
from tuneyard.service import Services
from tuneyard.service.auth import Principal, ensure_org
from tuneyard.service.jobs import Submission
from tuneyard.settings import Settings, get_settings

BODY = "".join(json.dumps(r) + "\n" for r in sample_rows()).encode()
# An image of an image row (tests/unit/test_data_images.py has the rest), made with Pillow.
RED_PNG = picture()
BUCKET = "training-data"
ACME = Principal(org_id="acme", key_id="k1", role="admin")
GLOBEX = Principal(org_id="globex", key_id="k2", role="admin")


@contextlib.contextmanager
def moto_s3(objects: dict[str, bytes], bucket: str = BUCKET) -> Iterator[dict]:
    """moto's S3 in server mode on loopback, checking signatures and IAM policies like AWS does.

    Yields ``url``, ``reader`` (an aws secret allowed to read the bucket), ``writer`` (allowed everything on
    S3: shared storage) and ``nobody`` (valid keys, no permissions). Setup runs before authentication is
    switched on; authentication is switched off and the accounts emptied again at the end, because moto keeps
    both per process, not per server.
    """
    import boto3
    import httpx
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    kw = {"endpoint_url": url, "region_name": "us-west-2", "aws_access_key_id": "setup",
          "aws_secret_access_key": "setup"}
    try:
        # moto's accounts live in the process, not in the server: start from none, whoever ran before.
        httpx.post(f"{url}/moto-api/reset").raise_for_status()
        iam = boto3.client("iam", **kw)
        secrets = {}
        for user, actions in (("reader", ["s3:GetObject", "s3:ListBucket"]), ("writer", ["s3:*"]), ("nobody", [])):
            iam.create_user(UserName=user)
            key = iam.create_access_key(UserName=user)["AccessKey"]
            if actions:
                iam.put_user_policy(UserName=user, PolicyName="read", PolicyDocument=json.dumps(
                    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
            secrets[user] = {"access_key_id": key["AccessKeyId"], "secret_access_key": key["SecretAccessKey"],
                             "region": "us-west-2"}
        s3 = boto3.client("s3", **kw)
        s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "us-west-2"})
        for key_name, body in objects.items():
            s3.put_object(Bucket=bucket, Key=key_name, Body=body)
        httpx.post(f"{url}/moto-api/reset-auth", content=b"0").raise_for_status()
        yield {"url": url, **secrets}
    finally:
        with contextlib.suppress(Exception):
            httpx.post(f"{url}/moto-api/reset-auth", content=b"inf")
            httpx.post(f"{url}/moto-api/reset")
        server.stop()


@pytest.fixture(scope="module")
def s3():
    # ds/big.jsonl: more than moto serves within a 0.05 s deadline.
    big = BODY * (12 * 1024 * 1024 // len(BODY) + 1)
    with moto_s3({"ds/train.jsonl": BODY, "ds/export": BODY, "ds/empty.jsonl": b"", "ds/big.jsonl": big,
                  "img/red.png": RED_PNG}) as m:
        yield m


def handing_over(monkeypatch, secret: dict, type_: str = "aws", param: str = "training_file") -> None:
    """What the worker does: the source's secret in the prepare process's environment."""
    monkeypatch.setenv(CREDENTIALS_ENV, json.dumps({param: {**secret, "type": type_}}))


def no_partials(root: Path) -> bool:
    return not [p for p in root.rglob("*") if p.name.endswith(".partial")] if root.exists() else True


# ----- s3:// --------------------------------------------------------------------------------------------------


def test_s3_images_are_read_with_the_jobs_secret(s3, monkeypatch, tmp_path):
    from tuneyard.data.images import ImageError, ImageRules, ImageStore, open_image

    monkeypatch.setenv("TUNEYARD_S3_ENDPOINT_URL", s3["url"])
    get_settings.cache_clear()
    try:
        store = ImageStore(tmp_path / "data", ImageRules.from_settings(None), param="training_file")
        with pytest.raises(ImageError, match="access denied"):
            store.put(f"s3://{BUCKET}/img/red.png")
        handing_over(monkeypatch, s3["reader"])
        stored = store.put(f"s3://{BUCKET}/img/red.png")
    finally:
        get_settings.cache_clear()
    assert open_image(tmp_path / "data", stored).getpixel((0, 0)) == (255, 0, 0)


def test_s3_object_is_downloaded_into_the_job(s3, monkeypatch, tmp_path):
    handing_over(monkeypatch, s3["reader"], param="dataset_details.dataset_path")
    src = DataSource(path=f"s3://{BUCKET}/ds/train.jsonl", param="dataset_details.dataset_path")
    local = materialise(src, tmp_path / "raw", s3_endpoint_url=s3["url"])
    assert Path(local.path) == tmp_path / "raw" / "dataset_details_dataset_path.jsonl"
    assert Path(local.path).read_bytes() == BODY and local.container == "auto"
    assert no_partials(tmp_path)


def test_s3_key_without_a_suffix_keeps_none_and_is_detected_from_its_bytes(s3, monkeypatch, tmp_path):
    handing_over(monkeypatch, s3["reader"])
    local = materialise(DataSource(path=f"s3://{BUCKET}/ds/export"), tmp_path / "raw", s3_endpoint_url=s3["url"])
    assert Path(local.path).name == "training_file" and detect_container(local.path) == "jsonl"


@pytest.mark.parametrize("uri,who,fragment", [
    (f"s3://{BUCKET}/ds/missing.jsonl", "reader", "no such key"),
    ("s3://no-such-bucket/x.jsonl", "reader", "no such bucket"),
    (f"s3://{BUCKET}/ds/empty.jsonl", "reader", "is empty"),
    (f"s3://{BUCKET}/ds/train.jsonl", "nobody", r"access denied \(check the secret's credentials"),
    (f"s3://{BUCKET}/ds/train.jsonl", "wrong-secret", "secret access key does not match"),
    (f"s3://{BUCKET}/ds/train.jsonl", "unknown-id", "access key id is not known"),
    (f"s3://{BUCKET}/ds/train.jsonl", None, "anonymous request; name a stored 'aws' secret"),
])
def test_s3_failures_name_the_field_and_the_problem(s3, monkeypatch, tmp_path, uri, who, fragment):
    secret = {"reader": s3["reader"], "nobody": s3["nobody"],
              "wrong-secret": {**s3["reader"], "secret_access_key": "Wr0ngWr0ngWr0ngWr0ng"},
              "unknown-id": {"access_key_id": "AKIAUNKNOWNUNKNOWN00", "secret_access_key": "Wr0ngWr0ngWr0ng"}}.get(who)
    if secret:
        handing_over(monkeypatch, secret, param="validation_file")
    with pytest.raises(SourceError, match=fragment) as e:
        materialise(DataSource(path=uri, param="validation_file"), tmp_path / "raw", s3_endpoint_url=s3["url"])
    assert e.value.param == "validation_file" and uri in e.value.message
    for value in (secret or {}).values():
        if value != "us-west-2":
            assert value not in e.value.message
    assert no_partials(tmp_path)


def test_s3_over_the_download_limit_is_refused_before_downloading(s3, monkeypatch, tmp_path):
    handing_over(monkeypatch, s3["reader"])
    with pytest.raises(SourceError, match="over the 10 byte download limit"):
        materialise(DataSource(path=f"s3://{BUCKET}/ds/train.jsonl"), tmp_path / "raw", s3_endpoint_url=s3["url"],
                    max_bytes=10)
    assert not list((tmp_path / "raw").iterdir())


def test_the_servers_own_aws_credentials_are_used_only_when_allowed(s3, monkeypatch, tmp_path):
    monkeypatch.delenv(CREDENTIALS_ENV, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3["reader"]["access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3["reader"]["secret_access_key"])
    src = DataSource(path=f"s3://{BUCKET}/ds/train.jsonl")
    with pytest.raises(SourceError, match="anonymous request"):
        materialise(src, tmp_path / "raw", s3_endpoint_url=s3["url"])
    local = materialise(src, tmp_path / "raw", s3_endpoint_url=s3["url"], s3_ambient_credentials=True)
    assert Path(local.path).read_bytes() == BODY


def test_a_secret_of_the_wrong_type_and_an_unreachable_endpoint(s3, monkeypatch, tmp_path):
    handing_over(monkeypatch, {"token": "hf_tokenvalue"}, type_="hf")
    with pytest.raises(SourceError, match="has type 'hf'; s3:// sources need a secret of type 'aws'") as e:
        materialise(DataSource(path=f"s3://{BUCKET}/ds/train.jsonl"), tmp_path / "raw", s3_endpoint_url=s3["url"])
    assert "hf_tokenvalue" not in e.value.message
    handing_over(monkeypatch, s3["reader"])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(SourceError, match="Could not connect to the endpoint URL") as e:
        materialise(DataSource(path=f"s3://{BUCKET}/ds/train.jsonl"), tmp_path / "raw", s3_endpoint_url=dead)
    assert s3["reader"]["secret_access_key"] not in e.value.message


# ----- https:// (plain http on loopback) ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """A loopback HTTP server: files, redirects (to itself, in a loop, to plain http elsewhere), a chunked body."""
    root = tmp_path_factory.mktemp("srv")
    (root / "train.jsonl").write_bytes(BODY)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *a):
            pass

        def do_GET(self):
            path = self.path.partition("?")[0]
            where = {"/moved": "/train.jsonl", "/loop": "/loop", "/to-http": "http://example.com/train.jsonl",
                     "/to-ftp": "ftp://127.0.0.1/train.jsonl",
                     "/to-private": "https://10.9.8.7/train.jsonl"}.get(path)
            if where:
                self.send_response(302)
                self.send_header("Location", where)
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif path in ("/trickle", "/stall"):
                # One byte every 0.4 s of a body that claims 200 (or headers, then nothing): only an overall
                # deadline ends the download; no single read waits long.
                self.send_response(200)
                self.send_header("Content-Length", "200")
                self.end_headers()
                with contextlib.suppress(OSError):
                    for _ in range(200 if path == "/trickle" else 0):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(0.4)
                    time.sleep(0 if path == "/trickle" else 8)
            elif path == "/chunked":
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for _ in range(8):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(BODY), BODY))
                self.wfile.write(b"0\r\n\r\n")
            else:
                super().do_GET()

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_http_download_and_redirects_on_loopback(web, tmp_path):
    local = materialise(DataSource(path=f"{web}/train.jsonl"), tmp_path / "raw")
    assert Path(local.path).read_bytes() == BODY and Path(local.path).name == "training_file.jsonl"
    moved = materialise(DataSource(path=f"{web}/moved", param="validation_file"), tmp_path / "raw")
    assert Path(moved.path).read_bytes() == BODY
    assert no_partials(tmp_path)


@pytest.mark.parametrize("path,kw,fragment", [
    ("/nope.jsonl?X-Amz-Signature=presigned-secret", {}, "answered 404"),
    ("/train.jsonl", {"max_bytes": 10}, "is [0-9,]+ bytes, over the 10 byte download limit"),
    ("/chunked", {"max_bytes": len(BODY) * 3}, "over the .* byte download limit"),
    ("/loop", {}, "more than 5 redirects"),
    ("/to-http", {}, "redirects to http://example.com/train.jsonl; only https://"),
    ("/to-ftp", {}, "redirects to ftp://"),
])
def test_http_failures_name_the_field(web, tmp_path, path, kw, fragment):
    with pytest.raises(SourceError, match=fragment) as e:
        materialise(DataSource(path=f"{web}{path}"), tmp_path / "raw", **kw)
    assert e.value.param == "training_file" and "presigned-secret" not in e.value.message
    assert no_partials(tmp_path) and not (tmp_path / "raw" / "training_file.jsonl").exists()


@pytest.mark.parametrize("path", ["/trickle", "/stall"])
def test_a_slow_download_is_cut_off_at_the_overall_deadline(web, tmp_path, path):
    started = time.monotonic()
    with pytest.raises(SourceError, match=r"did not finish downloading within the 1.5 second deadline "
                                          r"\(TUNEYARD_DOWNLOAD_TIMEOUT_SECONDS\)") as e:
        materialise(DataSource(path=f"{web}{path}?sig=presigned-secret", param="validation_file"), tmp_path / "raw",
                    deadline_seconds=1.5)
    assert 1.5 <= time.monotonic() - started < 6
    assert e.value.param == "validation_file" and f"{web}{path}?..." in e.value.message
    assert "presigned-secret" not in e.value.message
    assert no_partials(tmp_path) and not list((tmp_path / "raw").iterdir())
    # Without a deadline (0) the same server's whole body arrives; a generous one does not get in the way.
    local = materialise(DataSource(path=f"{web}/train.jsonl"), tmp_path / "raw", deadline_seconds=0)
    assert Path(local.path).read_bytes() == BODY


def test_an_s3_download_is_cut_off_at_the_overall_deadline(s3, monkeypatch, tmp_path):
    handing_over(monkeypatch, s3["reader"])
    with pytest.raises(SourceError, match="did not finish downloading within the 0.05 second deadline") as e:
        materialise(DataSource(path=f"s3://{BUCKET}/ds/big.jsonl"), tmp_path / "raw", s3_endpoint_url=s3["url"],
                    deadline_seconds=0.05)
    assert e.value.param == "training_file" and f"s3://{BUCKET}/ds/big.jsonl" in e.value.message
    assert no_partials(tmp_path)


def test_an_unreachable_host_fails_clearly(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(SourceError, match=f"cannot download http://127.0.0.1:{port}/x.jsonl: ConnectError"):
        materialise(DataSource(path=f"http://127.0.0.1:{port}/x.jsonl"), tmp_path / "raw")


# ----- hub datasets and hub-style directories ---------------------------------------------------------------------


def test_saved_datasets_give_the_split_asked_for(tmp_path):
    import datasets

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(sample_rows()),
                          "test": datasets.Dataset.from_list(sample_rows()[:2])}).save_to_disk(str(saved))
    local = materialise(DataSource(path=str(saved)), tmp_path / "raw")
    assert local.container == "parquet" and len(datasets.Dataset.from_parquet(local.path)) == len(sample_rows())
    test = materialise(DataSource(path=str(saved), split="test", param="validation_file"), tmp_path / "raw")
    assert Path(test.path).name == "validation_file.parquet" and len(datasets.Dataset.from_parquet(test.path)) == 2
    via_uri = materialise(DataSource(path=f"hf://{saved}?split=test"), tmp_path / "raw2")
    assert len(datasets.Dataset.from_parquet(via_uri.path)) == 2
    with pytest.raises(SourceError, match=r"has no split 'dev' \(it has test, train\)"):
        materialise(DataSource(path=str(saved), split="dev"), tmp_path / "raw")
    single = tmp_path / "single"
    datasets.Dataset.from_list(sample_rows()).save_to_disk(str(single))
    assert len(datasets.Dataset.from_parquet(materialise(DataSource(path=str(single)), tmp_path / "r3").path)) == 12
    with pytest.raises(SourceError, match="without splits"):
        materialise(DataSource(path=str(single), split="test"), tmp_path / "r3")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "state.json").write_text("{")
    with pytest.raises(SourceError, match="is not a readable saved dataset"):
        materialise(DataSource(path=str(tmp_path / "broken")), tmp_path / "r4")
    assert no_partials(tmp_path)


def test_directories_of_data_files(tmp_path):
    import datasets

    root = tmp_path / "repo"
    (root / "data").mkdir(parents=True)
    (root / "README.md").write_text("# a dataset card")
    (root / "data" / "train.jsonl").write_bytes(BODY)
    (root / "data" / "dev.jsonl").write_bytes(BODY[: BODY.index(b"\n") + 1])
    (root / ".cache").mkdir()
    (root / ".cache" / "train-old.jsonl").write_bytes(b"not read")
    # One file for the split: used where it lies, nothing copied.
    assert materialise(DataSource(path=str(root)), tmp_path / "raw").path == str(root / "data" / "train.jsonl")
    dev = materialise(DataSource(path=str(root), split="validation"), tmp_path / "raw")
    assert dev.path == str(root / "data" / "dev.jsonl")
    with pytest.raises(SourceError, match="has no data files for split 'test'"):
        materialise(DataSource(path=str(root), split="test"), tmp_path / "raw")

    shards = tmp_path / "shards"
    (shards / "data").mkdir(parents=True)
    half = len(sample_rows()) // 2
    for i, part in enumerate((sample_rows()[:half], sample_rows()[half:])):
        # The first shard lacks its final newline: shards are joined as whole lines regardless.
        text = "\n".join(json.dumps(r) for r in part) + ("" if i == 0 else "\n")
        (shards / "data" / f"train-0000{i}-of-00002.jsonl").write_text(text)
    joined = materialise(DataSource(path=str(shards)), tmp_path / "raw")
    lines = Path(joined.path).read_bytes().splitlines()
    assert len(lines) == len(sample_rows()) and all(json.loads(x) for x in lines)

    pq = tmp_path / "pq"
    pq.mkdir()
    datasets.Dataset.from_list(sample_rows()[:5]).to_parquet(str(pq / "train-00000-of-00002.parquet"))
    datasets.Dataset.from_list(sample_rows()[5:]).to_parquet(str(pq / "train-00001-of-00002.parquet"))
    combined = materialise(DataSource(path=str(pq)), tmp_path / "raw")
    assert combined.container == "parquet" and len(datasets.Dataset.from_parquet(combined.path)) == 12
    assert not [p for p in (tmp_path / "raw").iterdir() if p.name.startswith(".")]


def test_directory_problems_are_named(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(SourceError, match="neither a saved dataset nor a directory holding data files"):
        materialise(DataSource(path=str(bad)), tmp_path / "raw")
    (bad / "train.jsonl").write_bytes(BODY)
    (bad / "train.csv").write_text("prompt,completion\na,b\n")
    with pytest.raises(SourceError, match="mixes csv and jsonl files"):
        materialise(DataSource(path=str(bad)), tmp_path / "raw")
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "validation.jsonl").write_bytes(BODY)
    with pytest.raises(SourceError, match="no data files for split 'train'"):
        materialise(DataSource(path=str(splits)), tmp_path / "raw")
    outside = tmp_path / "outside.jsonl"
    outside.write_bytes(BODY)
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "train.jsonl").symlink_to(outside)
    with pytest.raises(SourceError, match="links outside the dataset directory") as e:
        materialise(DataSource(path=str(linked), param="validation_file"), tmp_path / "raw")
    assert e.value.param == "validation_file"


def test_hub_ids_fail_clearly_offline_and_leave_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError, match="cannot load hub dataset 'someone/nothing-here' at revision 'v1' "
                                          r"\(split 'test'\)") as e:
        materialise(DataSource(path="hf://datasets/someone/nothing-here@v1?split=test"), tmp_path / "raw")
    assert e.value.param == "training_file"
    assert not list((tmp_path / "raw").iterdir())


@pytest.fixture()
def fake_hub(monkeypatch) -> Iterator[list[str]]:
    """A hub API on loopback that describes one huge dataset; the requests it saw."""
    import huggingface_hub.constants

    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            seen.append(self.path)
            body = json.dumps({"id": "someone/huge", "sha": "0" * 40, "private": False, "siblings": [
                {"rfilename": "data/train-00000.parquet", "size": 40 * 1024**3},
                {"rfilename": "data/train-00001.parquet", "size": 40 * 1024**3},
                {"rfilename": "README.md", "size": 1000}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{httpd.server_address[1]}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    yield seen
    httpd.shutdown()


@pytest.mark.parametrize("url,address", [
    ("https://169.254.169.254/latest/meta-data/iam", "169.254.169.254"),  # cloud metadata
    ("https://10.1.2.3/train.jsonl", "10.1.2.3"),
    ("https://[fd00::1]/train.jsonl", "fd00::1"),
])
def test_https_to_private_networks_is_refused(tmp_path, url, address):
    with pytest.raises(SourceError, match=f"resolves to {address}, a private or reserved address") as e:
        materialise(DataSource(path=url), tmp_path / "raw")
    assert e.value.param == "training_file"
    assert no_partials(tmp_path)


def test_a_redirect_to_a_private_network_is_refused(web, tmp_path):
    with pytest.raises(SourceError, match="resolves to 10.9.8.7"):
        materialise(DataSource(path=f"{web}/to-private"), tmp_path / "raw")


def test_hub_datasets_over_the_download_limit_are_refused_before_downloading(tmp_path, fake_hub):
    with pytest.raises(SourceError, match=r"hub dataset 'someone/huge' is 85,899,346,920 bytes, over the "
                                          r"1,000,000 byte download limit") as e:
        materialise(DataSource(path="hf://datasets/someone/huge?split=train"), tmp_path / "raw", max_bytes=10**6)
    assert e.value.param == "training_file"
    assert fake_hub and all(p.startswith("/api/datasets/someone/huge") for p in fake_hub)
    assert not list((tmp_path / "raw").iterdir())


# ----- URI forms ---------------------------------------------------------------------------------------------


def test_uri_forms_are_checked_at_submit():
    assert parse_hub("huggingface://llamastack/simpleqa?split=test").split == "test"
    # Llama Stack's own form.
    assert parse_hub("huggingface://datasets/llamastack/simpleqa?split=train").repo == "llamastack/simpleqa"
    ref = parse_hub("hf://org/data@v2?subset=en")
    assert (ref.repo, ref.revision, ref.subset, ref.split) == ("org/data", "v2", "en", None)
    assert parse_hub("hf://org/data?split=a", DataSource(split="b")).split == "b"
    assert hub_local_dir("hf:///srv/data/ds?split=test") == "/srv/data/ds" and hub_local_dir("hf://o/n") is None
    assert display_uri("https://h/x.jsonl?X-Amz-Signature=s") == "https://h/x.jsonl?..."
    for good in ("s3://bucket/key.jsonl", "hf://datasets/llamastack/simpleqa", "hf:///srv/ds", "https://h/x",
                 "http://localhost:8000/x", "http://[::1]:8000/x"):
        check_uri(DataSource(path=good))
    for bad, fragment in [("s3://B/k", "s3://bucket/key"), ("s3://bucket", "s3://bucket/key"),
                          ("hf://../x", "hub dataset"), ("hf://a/b/c/d", "hub dataset"),
                          ("http://example.com/x.jsonl", "only from this machine"),
                          ("https://user:pw@example.com/x", "credentials in the URL"), ("https:///x", "has no host"),
                          ("gs://bucket/x.jsonl", "'gs://' is not a supported source"),
                          ("https://[::1/x", "is not a valid URL")]:
        with pytest.raises(InvalidRequest, match=fragment) as e:
            check_uri(DataSource(path=bad, param="validation_file"))
        assert e.value.param == "validation_file" and "pw" not in e.value.message


# ----- submit: URIs, secrets, confinement --------------------------------------------------------------------


@pytest.fixture()
def svc(tmp_path):
    settings = Settings(home=tmp_path / "home", local_roots=str(tmp_path / "local"), gpu_count=0)
    (tmp_path / "local").mkdir()
    services = Services.build(settings)
    for org in ("acme", "globex"):
        ensure_org(services.store, org)
    services.secrets.create(ACME, "aws-dev", "aws", {"access_key_id": "AKIAPLANTED", "secret_access_key": "pl4nted"})
    services.secrets.create(ACME, "hub", "hf", {"token": "hf_planted"})
    services.secrets.create(GLOBEX, "globex-aws", "aws", {"access_key_id": "AKIAGLOBEX", "secret_access_key": "g"})
    yield services
    services.store.dispose()


def submit(svc, who=ACME, **train):
    spec = TrainingSpec.model_validate({"model": {"name": "org/base"}, "data": {"train": train}})
    return svc.jobs.submit(who, Submission(spec=spec, dialect="test"))


@pytest.mark.parametrize("train,param,fragment", [
    ({"path": "s3://bucket/k.jsonl", "secret_id": "globex-aws"}, "secret_id", "secret 'globex-aws' not found"),
    ({"path": "s3://bucket/k.jsonl", "secret_id": "nothing"}, "secret_id", "secret 'nothing' not found"),
    ({"path": "s3://bucket/k.jsonl", "secret_id": "hub"}, "secret_id", "type 'hf'; s3:// sources need .* type 'aws'"),
    ({"path": "hf://o/n", "secret_id": "aws-dev"}, "secret_id", "type 'aws'; hf:// sources need .* type 'hf'"),
    ({"path": "https://h/x.jsonl", "secret_id": "aws-dev"}, "secret_id", "applies to s3:// sources and hub"),
    ({"path": "s3://Bad_Bucket/k"}, "training_file", "is not an s3://bucket/key URI"),
    ({"path": "ftp://h/x.jsonl"}, "training_file", "'ftp://' is not a supported source"),
    ({"path": "hf://o/n", "region": "us-east-1"}, "region", "applies to s3:// sources only"),
    ({"path": "s3://bucket/k.jsonl", "subset": "en"}, "subset", "applies to hub datasets"),
    ({"path": "hf:///etc?split=train"}, "training_file", "outside the allowed local roots"),
])
def test_remote_sources_are_checked_at_submit(svc, train, param, fragment):
    with pytest.raises(InvalidRequest, match=fragment) as e:
        submit(svc, **train)
    assert e.value.param == param


def test_a_foreign_secret_reads_exactly_like_a_missing_one(svc):
    messages = []
    for name in ("globex-aws", "no-such-secret-anywhere"):
        with pytest.raises(InvalidRequest) as e:
            submit(svc, path="s3://bucket/k.jsonl", secret_id=name)
        messages.append((e.value.code, e.value.param, e.value.message.replace(name, "X")))
    assert messages[0] == messages[1]


def test_accepted_sources_keep_names_not_values(svc, tmp_path):
    job = submit(svc, path="s3://bucket/k.jsonl", secret_id="aws-dev", region="eu-west-1")
    assert job.spec["data"]["train"]["secret_id"] == "aws-dev"
    spec_json = (Path(job.output_dir) / "spec.json").read_bytes()
    assert b"pl4nted" not in spec_json and b"AKIAPLANTED" not in spec_json
    assert submit(svc, path="hf://datasets/o/n?split=test", secret_id="hub").spec["data"]["train"]["path"]
    ds = tmp_path / "local" / "ds"
    (ds / "data").mkdir(parents=True)
    (ds / "data" / "test.jsonl").write_bytes(BODY)
    local = submit(svc, path=f"hf://{ds}?split=test").spec["data"]["train"]
    assert (local["path"], local["split"]) == (str(ds.resolve()), "test")
    (tmp_path / "local" / "one.jsonl").write_bytes(BODY)
    with pytest.raises(InvalidRequest, match="not to one file") as e:
        submit(svc, path=str(tmp_path / "local" / "one.jsonl"), split="test")
    assert e.value.param == "split"


def test_the_worker_hands_each_source_its_secret_through_the_environment_only(svc, tmp_path):
    from tuneyard.jobdir import JobDir
    from tuneyard.scheduler.local import LocalLauncher
    from tuneyard.scheduler.worker import Worker

    spec = TrainingSpec.model_validate({"model": {"name": "org/base"}, "data": {
        "train": {"path": "s3://bucket/k.jsonl", "secret_id": "aws-dev"},
        "validation": {"path": "hf://o/n", "secret_id": "hub", "param": "validation_file"}}})
    job = svc.jobs.submit(ACME, Submission(spec=spec, dialect="test"))
    env = Worker(svc.store, svc.settings, svc.files, worker_id="w")._source_credentials(job)
    assert json.loads(env[CREDENTIALS_ENV]) == {
        "training_file": {"access_key_id": "AKIAPLANTED", "secret_access_key": "pl4nted", "type": "aws"},
        "validation_file": {"token": "hf_planted", "type": "hf"}}

    # The launcher passes that on, and keeps the installation's own key out of every job process.
    os.environ["TUNEYARD_SECRET_KEY"] = "installation-key"
    try:
        jd = JobDir(tmp_path / "probe").create()
        proc = LocalLauncher()._spawn("ftjob-probe", "probe", [sys.executable, "-c", (
            "import os, json; print(json.dumps({k: os.environ.get(k) for k in "
            f"('TUNEYARD_SECRET_KEY', '{CREDENTIALS_ENV}')}}))")], jd, 0, env)
        assert proc.popen.wait(timeout=60) == 0
    finally:
        del os.environ["TUNEYARD_SECRET_KEY"]
    seen = json.loads((jd.logs / "probe-0.log").read_text().strip().splitlines()[-1])
    assert seen["TUNEYARD_SECRET_KEY"] is None and json.loads(seen[CREDENTIALS_ENV])["training_file"]["type"] == "aws"
    for path in svc.settings.jobs_dir.rglob("*"):
        assert not path.is_file() or b"pl4nted" not in path.read_bytes()


# ----- special files and repeated columns -------------------------------------------------------------------------


@contextlib.contextmanager
def special_files(root: Path) -> Iterator[dict[str, Path]]:
    """A FIFO and a listening Unix socket under ``root``: paths that exist but are not regular files."""
    root.mkdir(parents=True, exist_ok=True)
    fifo = root / "fifo.jsonl"
    os.mkfifo(fifo)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock.jsonl"))
    try:
        yield {"a FIFO (named pipe)": fifo, "a socket": root / "sock.jsonl"}
    finally:
        sock.close()


def test_special_files_are_named_for_what_they_are_at_submit_and_at_prepare(svc, tmp_path):
    from tuneyard.data.validate import validate_file

    with special_files(svc.settings.allowed_roots[0] / "special") as found:
        for kind, path in found.items():
            with pytest.raises(InvalidRequest, match=re.escape(f"regular file or directory: it is {kind}")) as e:
                svc.jobs.submit(ACME, _local_job(str(path)))
            assert e.value.param == "training_file" and "does not exist" not in e.value.message
            # A path swapped for one after submit: prepare says the same, and never opens it (that would block).
            report = validate_file(path)
            assert report.summary() == f"Training file is not a regular file: '{path}' is {kind}"
    assert validate_file(tmp_path / "nothing.jsonl").summary() == "Training file does not exist"
    assert validate_file(tmp_path).summary() == f"Training file is a directory, not a file ('{tmp_path}')"


def test_a_special_file_in_a_dataset_directory_is_refused_not_skipped(tmp_path):
    root = tmp_path / "repo"
    (root / "data").mkdir(parents=True)
    (root / "data" / "train-00000-of-00002.jsonl").write_bytes(BODY)
    os.mkfifo(root / "data" / "train-00001-of-00002.jsonl")
    with pytest.raises(SourceError, match=r"train-00001-of-00002.jsonl' is not a regular file: it is a FIFO") as e:
        materialise(DataSource(path=str(root), param="validation_file"), tmp_path / "raw")
    assert e.value.param == "validation_file"


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_shards_with_a_repeated_column_are_refused_not_renamed(tmp_path, suffix):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "repo"
    root.mkdir()
    good = {"prompt": ["Capital of France?"], "completion": ["Paris."]}
    for i, names in enumerate((["prompt", "completion"], ["prompt", "completion", "prompt"])):
        table = pa.Table.from_arrays([pa.array(good[n]) for n in names], names=names)
        path = root / f"train-0000{i}-of-00002.{suffix}"
        if suffix == "csv":
            path.write_text(",".join(names) + "\n" + ",".join(good[n][0] for n in names) + "\n")
        else:
            pq.write_table(table, path)
    where = "CSV header" if suffix == "csv" else "Parquet schema"
    with pytest.raises(SourceError, match=f"train-00001-of-00002.{suffix}': the {where} repeats column 'prompt'"):
        materialise(DataSource(path=str(root)), tmp_path / "raw")
    assert no_partials(tmp_path)


def _local_job(path: str) -> Submission:
    spec = TrainingSpec.model_validate({"model": {"name": "org/base"}, "data": {"train": {"path": path}}})
    return Submission(spec=spec, dialect="test")
