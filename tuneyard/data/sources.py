"""Where training rows come from: local files and directories, ``s3://``, ``https://`` and hub datasets (``hf://``).

The prepare step calls ``materialise`` on each source; everything after it reads one local file with the usual
readers (``data/validate.py``). Remote data lands in ``JOBDIR/data/raw/<param>.<ext>``: downloads stream to disk
under a temporary name and are renamed when complete, so memory does not grow with the data and a half download
is never read.

Forms accepted (checked at submit by ``check_uri``, fetched at prepare by ``materialise``):

- a local file: used as is; a local directory: a ``save_to_disk`` dataset (one split of it), or a directory of
  data files (hub layout: ``train.jsonl``, ``data/train-00000-of-00002.parquet``...; shards are combined);
- ``hf:///abs/dir``: the same local directory written as a hub URI (the service confines it and rewrites it to
  the plain path at submit);
- ``hf://owner/name[@revision][?split=train&subset=x]`` (also ``huggingface://``): a hub dataset, saved as Parquet;
- ``s3://bucket/key``: boto3, against ``TUNEYARD_S3_ENDPOINT_URL`` when set (MinIO, moto);
- ``https://...``; plain ``http://`` only from this machine (a test server, a local mirror), also after redirects,
  so data and anything a URL carries never cross the network in clear.

Every download has an overall wall-clock deadline (``TUNEYARD_DOWNLOAD_TIMEOUT_SECONDS``), not only a timeout
per read: a server that trickles a byte every few seconds must not hold a job in ``validating_files`` for ever.

Credentials come from the environment of the prepare process, where the worker put them
(``TUNEYARD_SOURCE_CREDENTIALS``: ``{param: {"type": ..., secret fields}}``); they are never written to the job
directory, and no message here contains them. An ``s3://`` source without a secret is read anonymously (a public
bucket), never with the server's own AWS credentials unless ``TUNEYARD_S3_AMBIENT_CREDENTIALS`` says so.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import socket
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneyard.data.validate import container_of_name, iter_raw
from tuneyard.domain.errors import InvalidRequest
from tuneyard.domain.spec import DataSource
from tuneyard.filekind import special_kind

CREDENTIALS_ENV = "TUNEYARD_SOURCE_CREDENTIALS"
SCHEMES = ("s3://", "https://", "http://", "hf://", "huggingface://")
HUB_SCHEMES = ("hf://", "huggingface://")
# The type of stored secret each kind of source takes (https:// takes none).
SECRET_TYPES = {"s3": "aws", "hf": "hf"}
S3_URI = re.compile(r"^s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])/(.+)$")
HF_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
CHUNK = 1024 * 1024
MAX_REDIRECTS = 5
DEFAULT_MAX_BYTES = 50 * 1024**3
DEFAULT_DEADLINE_SECONDS = 3600.0
SAVED_DATASET_MARKERS = ("dataset_dict.json", "dataset_info.json", "state.json")
# The words that name a split in data file names, as the hub's own loader reads them.
SPLIT_WORDS = {"train": {"train", "training"}, "validation": {"validation", "valid", "val", "dev"},
               "test": {"test", "testing", "eval", "evaluation"}}
URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class SourceError(Exception):
    """A source that cannot be fetched; ``param`` names the field it came from."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class Deadline:
    """The wall-clock end of one source's download; ``seconds`` 0 or None: no end."""

    def __init__(self, seconds: float | None, shown: str, param: str) -> None:
        self.seconds = seconds or 0.0
        self.end = time.monotonic() + self.seconds if self.seconds > 0 else float("inf")
        self.shown = shown
        self.param = param

    def remaining(self, cap: float) -> float:
        """Seconds left, at most ``cap`` (a timeout for the next network wait never outlives the deadline)."""
        return max(0.01, min(cap, self.end - time.monotonic()))

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.end

    def check(self) -> None:
        """Raise the deadline's SourceError once it has passed."""
        if self.expired:
            raise self.error()

    def error(self) -> SourceError:
        return SourceError(f"{self.shown} did not finish downloading within the {self.seconds:g} second deadline "
                           "(TUNEYARD_DOWNLOAD_TIMEOUT_SECONDS)", self.param)


def is_remote(path: str) -> bool:
    """True for the URI schemes this module handles (``s3://``, ``http(s)://``, ``hf://``, ``huggingface://``)."""
    return path.startswith(SCHEMES)


def is_uri(path: str) -> bool:
    """True for anything written as a URI (``scheme://``) other than ``file://``, supported or not."""
    return bool(URI.match(path)) and not path.startswith("file://")


def kind_of(path: str) -> str | None:
    """``"s3"``, ``"https"`` (also plain http), ``"hf"`` for a URI, None for a local path."""
    if path.startswith("s3://"):
        return "s3"
    if path.startswith(("https://", "http://")):
        return "https"
    if path.startswith(HUB_SCHEMES):
        return "hf"
    return None


def display_uri(uri: str) -> str:
    """``uri`` without its query string and fragment, for messages (a presigned URL's query is a credential)."""
    if kind_of(uri) != "https":
        return uri
    try:
        parsed = urllib.parse.urlsplit(uri)
    except ValueError:
        return uri.partition("?")[0]
    bare = urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, parsed.path, "", ""))
    return bare + "?..." if parsed.query else bare


@dataclass(frozen=True)
class HubRef:
    """A hub dataset named by an ``hf://`` URI; ``split`` None means the default (``train``)."""

    repo: str
    split: str | None
    subset: str | None
    revision: str | None


def parse_hub(uri: str, src: DataSource | None = None) -> HubRef:
    """``hf://[datasets/]owner/name[@revision][?split=train&subset=x]`` as a HubRef; the source's fields win."""
    rest = uri.split("://", 1)[1]
    rest, _, query = rest.partition("?")
    params = dict(urllib.parse.parse_qsl(query))
    repo, _, revision = rest.partition("@")
    repo = repo.strip("/")
    # Llama Stack and huggingface_hub's file system write hub datasets as hf://datasets/owner/name.
    if repo.startswith("datasets/") and repo.count("/") == 2:
        repo = repo.removeprefix("datasets/")
    split = (src.split if src else None) or params.get("split")
    subset = (src.subset if src else None) or params.get("subset") or params.get("name")
    revision = (src.revision if src else None) or revision or params.get("revision")
    return HubRef(repo=repo, split=split or None, subset=subset or None, revision=revision or None)


def hub_local_dir(uri: str) -> str | None:
    """The directory of an ``hf:///abs/dir`` URI (a hub-style dataset on this machine), else None."""
    if not uri.startswith(HUB_SCHEMES):
        return None
    rest = uri.split("://", 1)[1].partition("?")[0]
    return rest if rest.startswith("/") else None


def check_uri(src: DataSource) -> None:
    """Check a remote path's form at submit time (InvalidRequest naming the source's param)."""
    uri, param = src.path, src.param
    kind = kind_of(uri)
    if kind == "s3":
        if not S3_URI.match(uri):
            raise InvalidRequest(f"{param}: '{uri}' is not an s3://bucket/key URI (bucket names are 3-63 lowercase "
                                 "letters, digits, '.' or '-')", param=param)
    elif kind == "hf":
        if hub_local_dir(uri) is not None:
            return  # a local directory: confined by the caller like any local path
        ref = parse_hub(uri, src)
        if not HF_REPO.match(ref.repo) or ".." in ref.repo:
            raise InvalidRequest(f"{param}: '{uri}' does not name a hub dataset (hf://owner/name, or "
                                 "hf:///absolute/directory for one on this machine)", param=param)
    elif kind == "https":
        try:
            parsed = urllib.parse.urlsplit(uri)
            parsed.port  # noqa: B018 -- parsing the port is what raises for a malformed one
        except ValueError as e:
            raise InvalidRequest(f"{param}: '{display_uri(uri)}' is not a valid URL ({e})", param=param) from None
        if not parsed.hostname:
            raise InvalidRequest(f"{param}: '{display_uri(uri)}' has no host", param=param)
        if parsed.username or parsed.password:
            raise InvalidRequest(f"{param}: credentials in the URL are refused; store them as a secret",
                                 param=param)
        if parsed.scheme == "http" and not _loopback(parsed.hostname):
            raise InvalidRequest(f"{param}: plain http:// is accepted only from this machine; use https://",
                                 param=param)
    else:
        raise InvalidRequest(f"{param}: '{uri.split('://', 1)[0]}://' is not a supported source; use a local path, "
                             "s3://, https:// or hf://", param=param)


def credentials_for(param: str) -> dict[str, Any]:
    """The secret the worker handed over for the source named ``param`` (empty when none)."""
    raw = os.environ.get(CREDENTIALS_ENV)
    if not raw:
        return {}
    try:
        value = json.loads(raw).get(param)
    except (ValueError, AttributeError):
        return {}
    return dict(value) if isinstance(value, dict) else {}


def materialise(src: DataSource, dest_dir: Path, *, s3_endpoint_url: str | None = None,
                s3_ambient_credentials: bool = False, max_bytes: int = DEFAULT_MAX_BYTES,
                allow_private_hosts: bool = False, deadline_seconds: float = DEFAULT_DEADLINE_SECONDS,
                limit_name: str = "TUNEYARD_MAX_DOWNLOAD_BYTES") -> DataSource:
    """``src`` with ``path`` pointing at one local file holding its rows (a local file is returned as is).

    A remote download not done within ``deadline_seconds`` (0: no limit) fails with a SourceError saying so; one
    over ``max_bytes`` fails naming ``limit_name``, the setting that set it (images have their own).
    """
    local_dir = hub_local_dir(src.path)
    if local_dir is not None:
        ref = parse_hub(src.path, src)
        return _local_dataset_dir(src.model_copy(update={"path": local_dir, "split": ref.split}), dest_dir)
    kind = kind_of(src.path)
    if kind is None:
        return _local_dataset_dir(src, dest_dir) if src.path and Path(src.path).is_dir() else src
    dest_dir.mkdir(parents=True, exist_ok=True)
    creds = credentials_for(src.param)
    want = SECRET_TYPES.get(kind)
    if creds and creds.get("type", want) != want:
        raise SourceError(f"the secret given for {display_uri(src.path)} has type '{creds.get('type')}'; "
                          f"{kind}:// sources need a secret of type '{want}'" if want else
                          f"{display_uri(src.path)} takes no secret", src.param)
    deadline = Deadline(deadline_seconds, display_uri(src.path), src.param)
    if kind == "s3":
        return _from_s3(src, dest_dir, creds, s3_endpoint_url, s3_ambient_credentials, max_bytes, deadline,
                        limit_name)
    if kind == "https":
        return _from_https(src, dest_dir, max_bytes, allow_private_hosts, deadline, limit_name)
    return _from_hub(src, dest_dir, creds, max_bytes, deadline)


# ----- downloads -----------------------------------------------------------------------------------


def _target(src: DataSource, name: str) -> str:
    """The file name a download is kept under: the param, plus the source's suffix when it names a container."""
    suffix = Path(name).suffix.lower()
    return src.param.replace(".", "_") + (suffix if container_of_name(name) else "")


@contextmanager
def _atomic(final: Path) -> Iterator[Path]:
    """A temporary path beside ``final``, renamed to it when the block completes and removed when it fails."""
    partial = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        yield partial
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(final)


S3_ERRORS = {
    "NoSuchKey": "no such key",
    "NoSuchBucket": "no such bucket",
    "AccessDenied": "access denied (check the secret's credentials and the bucket's policy)",
    "403": "access denied (check the secret's credentials and the bucket's policy)",
    "AllAccessDisabled": "access denied (check the secret's credentials and the bucket's policy)",
    "InvalidAccessKeyId": "the secret's access key id is not known to S3",
    "SignatureDoesNotMatch": "the secret's secret access key does not match its access key id",
    "ExpiredToken": "the secret's session token has expired",
    "InvalidToken": "the secret's session token is not valid",
    "TokenRefreshRequired": "the secret's session token has expired",
    "PermanentRedirect": "the bucket is in another region (set region)",
    "AuthorizationHeaderMalformed": "the bucket is in another region (set region)",
    "IllegalLocationConstraintException": "the bucket is in another region (set region)",
}


def _from_s3(src: DataSource, dest_dir: Path, creds: dict, endpoint: str | None, ambient: bool,
             max_bytes: int, deadline: Deadline, limit_name: str = "TUNEYARD_MAX_DOWNLOAD_BYTES") -> DataSource:
    import boto3
    from boto3.exceptions import Boto3Error
    from boto3.s3.transfer import TransferConfig
    from botocore import UNSIGNED
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    m = S3_URI.match(src.path)
    if m is None:
        raise SourceError(f"'{src.path}' is not an s3://bucket/key URI", src.param)
    bucket, key = m.groups()
    signed = bool(creds) or ambient
    if creds:
        session = boto3.session.Session(aws_access_key_id=creds.get("access_key_id"),
                                        aws_secret_access_key=creds.get("secret_access_key"),
                                        aws_session_token=creds.get("session_token"),
                                        region_name=src.region or creds.get("region"))
    else:
        session = boto3.session.Session(region_name=src.region)
    # Without a secret, requests are anonymous: a tenant must not read buckets with the server's own identity.
    # A stalled connection waits no longer than the deadline; the transfer's progress callback checks it between
    # the chunks of a trickling one.
    config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=deadline.remaining(15),
                    read_timeout=deadline.remaining(60), **({} if signed else {"signature_version": UNSIGNED}))
    client = session.client("s3", endpoint_url=endpoint, config=config)
    final = dest_dir / _target(src, key)
    try:
        # A one-byte ranged GET rather than HEAD: HEAD errors have no body, so a missing bucket, a missing key and
        # a wrong key id would all read "404"/"403".
        probe = client.get_object(Bucket=bucket, Key=key, Range="bytes=0-0")
        probe["Body"].close()
        size = int(str(probe.get("ContentRange", "")).rpartition("/")[2] or probe.get("ContentLength", 0))
        if size > max_bytes:
            raise SourceError(f"{src.path} is {size:,} bytes, over the {max_bytes:,} byte download limit "
                              f"({limit_name})", src.param)
        with _atomic(final) as partial:
            client.download_file(bucket, key, str(partial), Callback=lambda _: deadline.check(),
                                 Config=TransferConfig(multipart_chunksize=8 * CHUNK, max_concurrency=4))
    except NoCredentialsError:
        raise SourceError(f"no credentials to read {src.path}: name a stored 'aws' secret (secret_id)",
                          src.param) from None
    except ClientError as e:
        err = e.response.get("Error", {})
        code = str(err.get("Code", ""))
        if code == "InvalidRange":
            raise SourceError(f"{src.path} is empty", src.param) from None
        why = S3_ERRORS.get(code, f"S3 error {code or e.response.get('ResponseMetadata', {}).get('HTTPStatusCode')}")
        if code in ("AccessDenied", "403", "AllAccessDisabled") and not creds:
            why = ("access denied to the server's own AWS identity (TUNEYARD_S3_AMBIENT_CREDENTIALS)" if signed else
                   "access denied to an anonymous request; name a stored 'aws' secret (secret_id)")
        if "region" in why and err.get("Region"):
            why = f"the bucket is in region '{err['Region']}' (set region)"
        raise SourceError(f"cannot read {src.path}: {why}", src.param) from None
    except (BotoCoreError, Boto3Error) as e:
        # Boto3Error: the transfer's own failures (RetriesExceededError after read timeouts), not botocore's.
        if deadline.expired:
            raise deadline.error() from None
        # botocore's messages name the endpoint or the problem, never the keys.
        raise SourceError(f"cannot read {src.path}: {e}", src.param) from None
    return src.model_copy(update={"path": str(final)})


def check_host(url: str, allow_private: bool, shown: str, param: str) -> None:
    """Refuse a download from a private network (cloud metadata, internal services): the server makes the
    request, so a URL must not reach what the caller could not. Loopback stays allowed (local data servers)."""
    host = urllib.parse.urlsplit(url).hostname or ""
    if allow_private or _loopback(host):
        return
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (OSError, UnicodeError):
        return  # the request itself reports that the host cannot be resolved
    for address in sorted(addresses):
        ip = ipaddress.ip_address(address.split("%")[0])
        if ip.is_loopback:
            continue
        if ip.is_private or ip.is_link_local or ip.is_reserved or ip.is_multicast or ip.is_unspecified:
            raise SourceError(f"{shown} resolves to {ip}, a private or reserved address; downloads from private "
                              "networks are off (TUNEYARD_DOWNLOAD_ALLOW_PRIVATE_HOSTS)", param)


def _from_https(src: DataSource, dest_dir: Path, max_bytes: int, allow_private: bool,
                deadline: Deadline, limit_name: str = "TUNEYARD_MAX_DOWNLOAD_BYTES") -> DataSource:
    import httpx

    shown = display_uri(src.path)
    final = dest_dir / _target(src, urllib.parse.urlsplit(src.path).path or "data")
    url = src.path
    try:
        with httpx.Client(follow_redirects=False) as client:
            for _ in range(MAX_REDIRECTS + 1):
                check_host(url, allow_private, display_uri(url), src.param)
                # No single wait outlives the deadline; between reads _stream_to checks it.
                timeout = httpx.Timeout(deadline.remaining(60), connect=deadline.remaining(15))
                with client.stream("GET", url, timeout=timeout) as r:
                    if r.is_redirect and "location" in r.headers:
                        try:
                            url = str(r.url.join(r.headers["location"]))
                            hop = urllib.parse.urlsplit(url)
                        except (ValueError, httpx.InvalidURL):
                            raise SourceError(f"{shown} redirects to a malformed URL", src.param) from None
                        # Each hop is checked like the first: no downgrade to plain http off this machine.
                        if hop.scheme not in ("https", "http") or (hop.scheme == "http" and
                                                                    not _loopback(hop.hostname or "")):
                            raise SourceError(f"{shown} redirects to {display_uri(url)}; only https:// (or http:// "
                                              "on this machine) is followed", src.param)
                        continue
                    if r.status_code != 200:
                        raise SourceError(f"GET {shown} answered {r.status_code} {r.reason_phrase}".rstrip(),
                                          src.param)
                    declared = r.headers.get("content-length", "")
                    length = int(declared) if declared.isdigit() else 0
                    if length > max_bytes:
                        raise SourceError(f"{shown} is {length:,} bytes, over the {max_bytes:,} byte download "
                                          f"limit ({limit_name})", src.param)
                    # Chunks as they arrive (not gathered to CHUNK): a trickle is seen, and cut off, at each read.
                    _stream_to(final, r.iter_bytes(), max_bytes, shown, src.param, deadline, limit_name)
                    return src.model_copy(update={"path": str(final)})
    except httpx.HTTPError as e:
        if deadline.expired:
            raise deadline.error() from None
        raise SourceError(f"cannot download {shown}: {type(e).__name__}", src.param) from None
    raise SourceError(f"{shown}: more than {MAX_REDIRECTS} redirects", src.param)


def _stream_to(final: Path, chunks: Iterator[bytes], max_bytes: int, shown: str, param: str,
               deadline: Deadline, limit_name: str = "TUNEYARD_MAX_DOWNLOAD_BYTES") -> None:
    size = 0
    with _atomic(final) as partial, partial.open("wb") as out:
        for chunk in chunks:
            deadline.check()
            size += len(chunk)
            if size > max_bytes:
                raise SourceError(f"{shown} is over the {max_bytes:,} byte download limit ({limit_name})", param)
            out.write(chunk)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ----- hub datasets and hub-style directories ------------------------------------------------------------


def hub_dataset_bytes(repo: str, revision: str | None, token: str | None) -> int | None:
    """The size of a hub dataset repository's files, or None when the hub does not say (offline, say)."""
    try:
        from huggingface_hub import HfApi

        info = HfApi(token=token).dataset_info(repo, revision=revision, files_metadata=True)
    except Exception:  # the download that follows reports why the hub cannot be used
        return None
    sizes = [f.size for f in info.siblings or [] if f.size is not None]
    return sum(sizes) if sizes else None


def _from_hub(src: DataSource, dest_dir: Path, creds: dict, max_bytes: int, deadline: Deadline) -> DataSource:
    import datasets

    ref = parse_hub(src.path, src)
    split = ref.split or "train"
    # The datasets library downloads what a split needs with no limit of its own: check the repository first.
    size = hub_dataset_bytes(ref.repo, ref.revision, creds.get("token"))
    if size is not None and size > max_bytes:
        raise SourceError(f"hub dataset '{ref.repo}' is {size:,} bytes, over the {max_bytes:,} byte download limit "
                          "(TUNEYARD_MAX_DOWNLOAD_BYTES)", src.param)
    final = dest_dir / f"{src.param.replace('.', '_')}.parquet"
    # A cache of this job's own: what one organisation's token fetched is never served to another from a shared
    # cache, and the copy goes away once the Parquet file is written.
    cache = dest_dir / f".hf-cache-{src.param.replace('.', '_')}"
    try:
        try:
            ds = _within(deadline, lambda: datasets.load_dataset(
                ref.repo, ref.subset, split=split, revision=ref.revision, token=creds.get("token"),
                cache_dir=str(cache)))
        except SourceError:
            raise
        except Exception as e:  # the hub client raises many kinds (offline, not found, gated, bad split or subset)
            raise SourceError(_hub_problem(ref.repo, split, ref.revision, e), src.param) from None
        with _atomic(final) as partial:
            ds.to_parquet(str(partial))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return src.model_copy(update={"path": str(final), "container": "parquet"})


def _within(deadline: Deadline, work: Callable[[], Any]) -> Any:
    """``work()``'s result, or the deadline's SourceError when it has not returned by then.

    For downloads with no hook between reads (the datasets library's): the work runs in a daemon thread, which the
    prepare process leaves behind when it reports the failure and exits.
    """
    if deadline.seconds <= 0:
        return work()
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = work()
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    worker = threading.Thread(target=run, name="tuneyard-download", daemon=True)
    worker.start()
    worker.join(max(0.0, deadline.end - time.monotonic()))
    if worker.is_alive():
        raise deadline.error()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _hub_problem(repo: str, split: str, revision: str | None, e: Exception) -> str:
    name = type(e).__name__
    text = str(e).strip().splitlines()[0][:300] if str(e).strip() else name
    at = f" at revision '{revision}'" if revision else ""
    if name in ("DatasetNotFoundError", "RepositoryNotFoundError", "FileNotFoundError"):
        why = "no such dataset on the hub, or it is private (name an 'hf' secret, secret_id)"
    elif name == "GatedRepoError" or "gated" in text.lower():
        why = "the dataset is gated: accept its terms on the hub and name an 'hf' secret (secret_id)"
    elif name == "RevisionNotFoundError":
        why = "no such revision"
    elif "split" in text.lower():
        why = f"no split '{split}' ({text})"
    elif "offline" in text.lower() or name in ("ConnectionError", "OfflineModeIsEnabled"):
        why = f"the hub cannot be reached ({text})"
    else:
        why = f"{name}: {text}"
    return f"cannot load hub dataset '{repo}'{at} (split '{split}'): {why}"


def _local_dataset_dir(src: DataSource, dest_dir: Path) -> DataSource:
    """A local directory: a ``save_to_disk`` dataset, or a directory of data files, as one local file."""
    root = Path(src.path)
    if not root.is_dir():
        raise SourceError(f"'{root}' is not a directory", src.param)
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / f"{src.param.replace('.', '_')}.parquet"
    if any((root / n).exists() for n in SAVED_DATASET_MARKERS):
        return _saved_dataset(src, root, final)
    files = _data_files(root, src.param)
    if not files:
        raise SourceError(f"'{root}' is neither a saved dataset nor a directory holding data files (.jsonl, .json, "
                          ".csv, .parquet)", src.param)
    wanted = src.split or "train"
    words = SPLIT_WORDS.get(wanted, {wanted})
    chosen = [p for p in files if words & _name_tokens(p.relative_to(root))]
    if not chosen:
        named = any(set().union(*SPLIT_WORDS.values()) & _name_tokens(p.relative_to(root)) for p in files)
        if src.split or named:
            raise SourceError(f"'{root}' has no data files for split '{wanted}' (it has "
                              f"{', '.join(str(p.relative_to(root)) for p in files[:5])})", src.param)
        # Files that name no split at all are one split: the training rows.
        chosen = files
    containers = {container_of_name(p.name) for p in chosen}
    if len(containers) > 1:
        raise SourceError(f"'{root}' mixes {' and '.join(sorted(c or '?' for c in containers))} files for split "
                          f"'{wanted}'; keep one kind", src.param)
    if len(chosen) == 1:
        return src.model_copy(update={"path": str(chosen[0])})
    return _combine(src, chosen, containers.pop() or "jsonl", dest_dir)


def _saved_dataset(src: DataSource, root: Path, final: Path) -> DataSource:
    import datasets

    try:
        ds = datasets.load_from_disk(str(root))
    except Exception as e:
        raise SourceError(f"'{root}' is not a readable saved dataset ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''})", src.param) from None
    if isinstance(ds, datasets.DatasetDict):
        split = src.split or ("train" if "train" in ds else next(iter(ds)))
        if split not in ds:
            raise SourceError(f"'{root}' has no split '{split}' (it has {', '.join(sorted(ds))})", src.param)
        ds = ds[split]
    elif src.split and src.split != "train":
        raise SourceError(f"'{root}' is a single dataset without splits; split '{src.split}' does not apply",
                          src.param)
    with _atomic(final) as partial:
        ds.to_parquet(str(partial))
    return src.model_copy(update={"path": str(final), "container": "parquet"})


def _data_files(root: Path, param: str) -> list[Path]:
    """Data files under ``root`` (hidden files and directories skipped); a link out of it is refused."""
    base = root.resolve()
    found = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not container_of_name(p.name):
            continue
        special = special_kind(p)
        if special is not None:
            # A data file's name on a FIFO or device: skipping it would train on part of the data, reading it
            # would block.
            raise SourceError(f"'{p}' is not a regular file: it is {special}", param)
        if not p.is_file():
            continue
        # The directory was confined to the allowed roots at submit; a link inside it must not lead elsewhere.
        if not p.resolve().is_relative_to(base):
            raise SourceError(f"'{p}' links outside the dataset directory '{root}'", param)
        found.append(p)
    return found


def _name_tokens(rel: Path) -> set[str]:
    """The words of a relative path, so ``data/train-00000-of-00002.parquet`` names split ``train``."""
    words = re.split(r"[-_./\\ ]+", str(rel.with_suffix("")).lower())
    return {w for w in words if w}


def _combine(src: DataSource, files: list[Path], container: str, dest_dir: Path) -> DataSource:
    """Shards of one split as one file: JSONL concatenated as bytes, other containers through ``datasets``."""
    if container == "jsonl":
        final = dest_dir / f"{src.param.replace('.', '_')}.jsonl"
        with _atomic(final) as partial, partial.open("wb") as out:
            for p in files:
                last = b"\n"
                with p.open("rb") as f:
                    while chunk := f.read(CHUNK):
                        out.write(chunk)
                        last = chunk[-1:]
                if last != b"\n":
                    out.write(b"\n")
        return src.model_copy(update={"path": str(final), "container": "jsonl"})
    import datasets

    for p in files:
        # The library renames a repeated CSV column ("x.1") and keeps one of two Parquet ones: check each shard's
        # header (and that it can be read at all) the way one file is checked.
        first = next(iter_raw(p, container), None)
        if first is not None and first[0] is None and first[2] is not None:
            raise SourceError(f"'{p}': {first[2].render(None)}", src.param)
    builder = {"json": "json", "csv": "csv", "parquet": "parquet"}[container]
    final = dest_dir / f"{src.param.replace('.', '_')}.parquet"
    cache = dest_dir / f".combine-cache-{src.param.replace('.', '_')}"
    try:
        try:
            ds = datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train",
                                       cache_dir=str(cache))
        except Exception as e:
            raise SourceError(f"cannot combine the {len(files)} {container} files of '{src.path}' "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})",
                              src.param) from None
        with _atomic(final) as partial:
            ds.to_parquet(str(partial))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return src.model_copy(update={"path": str(final), "container": "parquet"})
