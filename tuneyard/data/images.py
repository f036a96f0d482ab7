"""The images of image rows: where each comes from, what the API process may check, and the prepare step's store.

A REF (``tuneyard.data.formats``) is a ``data:image/...;base64,`` URI, an ``https://`` or ``s3://`` URL, or a path:
relative to the dataset file's directory (or URL, for a dataset fetched from ``s3://``/``https://``) or absolute,
and in both cases under the allowed local roots (``tuneyard/service/paths.py``). A relative path in an uploaded
file has nothing to be relative to and is refused.

Two stages, so that no pixel is decoded in the API process:

* ``ImageChecker`` (upload validation, and the prepare step's validation before anything is fetched): per REF, its
  form; for inline and local images also the bytes (``TUNEYARD_MAX_IMAGE_BYTES``), the header Pillow's
  ``Image.open`` reads (type JPEG/PNG/WEBP/GIF, the declared size against ``TUNEYARD_MAX_IMAGE_PIXELS``, Pillow's
  decompression-bomb refusal) and the container's structure (a PNG's chunk CRCs through IEND, a JPEG's end
  marker after its scan, a GIF's trailer, a WEBP's RIFF length), which finds a truncated file without decoding.
  Remote images are checked for form only: the API process never downloads them.
* ``ImageStore`` (the prepare step): each REF fetched once (``tuneyard/data/sources.py``: the same private-address,
  size and deadline rules as datasets, the job's secret for ``s3://``), checked as above, decoded in full, resized
  to the job's ``max_pixels``/``min_pixels`` when given, and kept as ``data/images/<sha256>.<ext>``
  (content-addressed: the same picture is kept once; a GIF's first frame becomes a PNG). ``index.json`` there
  maps each source to its stored image, so a prepare step that runs again reuses them, and the trainer only ever
  opens stored files (``open_image``): epochs and resumes neither download nor re-decode a source.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import math
import re
import tempfile
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneyard.data.formats import ImageSite, Problem

ACCEPTED = ("JPEG", "PNG", "WEBP", "GIF")
# The stored file's extension per decoded type; a GIF is kept as its first frame, in PNG.
STORED_EXT = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp", "GIF": "png"}
STORED_REF = re.compile(r"^images/[0-9a-f]{64}\.(png|jpeg|webp)$")
IMAGES_DIR = "images"
INDEX_FILE = "index.json"
_DATA_URI = re.compile(r"^data:([^;,]*)((?:;[^;,]*)*),", re.IGNORECASE)
# Checks of distinct REFs remembered per file (a file naming one picture on every row checks it once).
_MEMO = 100_000


class ImageError(ValueError):
    """An image that cannot be used; ``message`` says why, naming the image."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class ImageRules:
    """What an image must satisfy, and where relative paths start (``base``: None for an uploaded file)."""

    base: str | None
    roots: tuple[Path, ...]
    max_bytes: int
    max_pixels: int
    max_per_example: int
    max_image_examples: int

    @classmethod
    def from_settings(cls, base: str | None, settings: Any = None) -> ImageRules:
        """The installation's limits (``TUNEYARD_MAX_IMAGE_*``, ``TUNEYARD_LOCAL_ROOTS``): from ``settings`` (the
        server's ``Settings``, or in a job's process the spec's ``RuntimeSpec``), else the process's own."""
        from tuneyard.settings import get_settings

        s = settings or get_settings()
        # A spec written without the roots (an older one, or one a test builds) falls back to the process's.
        roots = s.allowed_roots or get_settings().allowed_roots
        return cls(base=base, roots=tuple(Path(r) for r in roots), max_bytes=s.max_image_bytes,
                   max_pixels=s.max_image_pixels, max_per_example=s.max_images_per_example,
                   max_image_examples=s.max_image_examples)


@dataclass(frozen=True)
class ImageInfo:
    """What an image's header says."""

    format: str
    width: int
    height: int


def base_of(location: str) -> str:
    """Where the relative image paths of a dataset at ``location`` (a local path or a URL) start."""
    if "://" in location and not location.startswith("file://"):
        parsed = urllib.parse.urlsplit(location)
        return urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, parsed.path.rpartition("/")[0] + "/", "", ""))
    return str(Path(location.removeprefix("file://")).parent)


def shown(ref: str) -> str:
    """A REF as messages show it: a data URI cut short, a URL without its query (a presigned one's is a key)."""
    if ref[:5].lower() == "data:":
        return ref[: ref.find(",") + 1] + "..." if "," in ref[:80] else ref[:40] + "..."
    from tuneyard.data.sources import display_uri

    shown_ref = display_uri(ref)
    if "@" in shown_ref.partition("://")[2].partition("/")[0]:
        # Credentials in the URL (refused anyway) are not repeated in the message.
        scheme, _, rest = shown_ref.partition("://")
        host, _, path = rest.partition("/")
        shown_ref = f"{scheme}://{host.rpartition('@')[2]}/{path}"
    return shown_ref


def locate(ref: str, rules: ImageRules) -> tuple[str, str]:
    """``(kind, target)``: ``("data", ref)``, ``("https"|"s3", url)`` or ``("path", absolute path)``; ImageError."""
    from tuneyard.data.sources import is_uri, kind_of

    if ref[:5].lower() == "data:":
        return "data", ref
    target = ref
    if not is_uri(ref) and not ref.startswith(("/", "file://", "~")):
        if rules.base is None:
            raise ImageError(f"image '{shown(ref)}' is a relative path, and an uploaded file has no directory for it "
                             "to be relative to; use a URL, a data URI or an absolute path under the allowed roots")
        target = urllib.parse.urljoin(rules.base, ref) if is_uri(rules.base) else str(Path(rules.base) / ref)
    if is_uri(target):
        kind = kind_of(target)
        if kind not in ("https", "s3"):
            raise ImageError(f"image '{shown(ref)}': '{target.split('://', 1)[0]}://' is not a supported image "
                             "source; use https://, s3://, a data URI or a path")
        _check_url(target, kind)
        return kind, target
    return "path", str(_confine(target, ref, rules))


def _check_url(url: str, kind: str) -> None:
    from tuneyard.data.sources import check_uri
    from tuneyard.domain.errors import TuneyardError
    from tuneyard.domain.spec import DataSource

    try:
        check_uri(DataSource(path=url, param="image"))
    except TuneyardError as e:
        raise ImageError(f"image '{shown(url)}': {e.message.removeprefix('image: ')}") from None


def _confine(target: str, ref: str, rules: ImageRules) -> Path:
    from tuneyard.domain.errors import TuneyardError
    from tuneyard.service.paths import confine

    try:
        return confine(target, list(rules.roots), param="image", want_dir=False)
    except TuneyardError as e:
        # The roots are the installation's business; the setting that widens them is named.
        why = re.sub(r" \(([^)]*)\); set TUNEYARD_LOCAL_ROOTS", "; set TUNEYARD_LOCAL_ROOTS",
                     e.message.removeprefix("image: "))
        if target != ref:
            why = why.replace(f"'{target}'", f"'{ref}' ({target})", 1)
        raise ImageError(f"image {why}") from None


def decode_data_uri(ref: str, max_bytes: int) -> bytes:
    """The bytes of a ``data:image/...;base64,`` URI (no larger than ``max_bytes``); ImageError otherwise."""
    m = _DATA_URI.match(ref)
    if m is None:
        raise ImageError(f"image '{shown(ref)}' is not a valid data URI (data:image/png;base64,...)")
    mime, params = m.group(1).strip().lower(), m.group(2).lower()
    if mime and not mime.startswith("image/"):
        raise ImageError(f"image '{shown(ref)}' is a data URI of type '{mime}', not an image")
    if ";base64" not in params:
        raise ImageError(f"image '{shown(ref)}' is not base64-encoded (data:image/png;base64,...)")
    payload = "".join(ref[m.end():].split())
    # Refused before decoding: base64 takes 4 characters for every 3 bytes.
    if len(payload) // 4 * 3 > max_bytes + 2:
        raise ImageError(f"image '{shown(ref)}' holds about {len(payload) // 4 * 3:,} bytes, over the {max_bytes:,} "
                         "byte limit (TUNEYARD_MAX_IMAGE_BYTES)")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"image '{shown(ref)}': the data URI's base64 is not valid") from None
    _check_size(len(data), ref, max_bytes)
    return data


def _check_size(size: int, ref: str, max_bytes: int) -> None:
    if size == 0:
        raise ImageError(f"image '{shown(ref)}' is empty (0 bytes)")
    if size > max_bytes:
        raise ImageError(f"image '{shown(ref)}' is {size:,} bytes, over the {max_bytes:,} byte limit "
                         "(TUNEYARD_MAX_IMAGE_BYTES)")


def read_local(path: str, ref: str, max_bytes: int) -> bytes:
    """A local image's bytes, its size checked before it is read."""
    p = Path(path)
    _check_size(p.stat().st_size, ref, max_bytes)
    return p.read_bytes()


def inspect(data: bytes, ref: str, max_pixels: int) -> ImageInfo:
    """The header and structure of an image, without decoding its pixels; ImageError naming what is wrong."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) < int.from_bytes(data[4:8], "little") + 8:
        # Pillow's WEBP reader hands the whole file to libwebp, whose complaint ("could not create decoder
        # object") does not say that the file is cut short.
        raise ImageError(f"image '{shown(ref)}' is truncated: the WEBP file declares "
                         f"{int.from_bytes(data[4:8], 'little') + 8:,} bytes and holds {len(data):,}")
    im = _open(data, ref)
    w, h = im.size
    if w * h > max_pixels:
        raise ImageError(f"image '{shown(ref)}' is {w}x{h} = {w * h:,} pixels, over the {max_pixels:,} pixel limit "
                         "(TUNEYARD_MAX_IMAGE_PIXELS)")
    fmt = im.format or ""
    why = None
    if fmt == "PNG":
        try:
            # Reads every chunk through IEND and checks its CRC; inflates nothing.
            im.verify()
        except Exception as e:  # Pillow raises OSError, SyntaxError, struct.error... for a damaged file
            why = f"truncated or damaged ({e})"
    elif fmt == "JPEG":
        scan = data.find(b"\xff\xda")
        # In the entropy-coded scan an 0xFF byte is always stuffed or a restart marker: FFD9 after it is the end.
        if scan < 0 or data.rfind(b"\xff\xd9") < scan:
            why = "truncated: the JPEG data ends before its end-of-image marker"
    elif fmt == "GIF" and not data.rstrip(b"\x00").endswith(b";"):
        why = "truncated: the GIF data ends before its trailer"
    if why:
        raise ImageError(f"image '{shown(ref)}' is {why}")
    return ImageInfo(fmt, w, h)


def _open(data: bytes, ref: str) -> Any:
    """``Image.open`` (the header only) limited to the accepted types, its failures worded."""
    from PIL import Image, UnidentifiedImageError

    with warnings.catch_warnings():
        # Sizes between Pillow's warning and its error are judged by TUNEYARD_MAX_IMAGE_PIXELS instead.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(data), formats=list(ACCEPTED))
        except Image.DecompressionBombError as e:
            raise ImageError(f"image '{shown(ref)}' is refused as a decompression bomb, without decoding it ({e})"
                             ) from None
        except UnidentifiedImageError:
            pass
        except Exception as e:  # a damaged header: OSError, SyntaxError, ValueError, struct.error...
            raise ImageError(f"image '{shown(ref)}' is not a readable image ({e})") from None
        try:
            other = Image.open(io.BytesIO(data)).format
        except Exception:  # not an image Pillow knows at all (or a bomb of another type)
            other = None
    if other:
        raise ImageError(f"image '{shown(ref)}' is of type {other}; JPEG, PNG, WEBP and GIF (its first frame) are "
                         "accepted")
    raise ImageError(f"image '{shown(ref)}' is not a readable image: its bytes are no JPEG, PNG, WEBP or GIF")


class ImageChecker:
    """The checks of one file's images that need no download and no decoding; each distinct REF checked once."""

    def __init__(self, rules: ImageRules) -> None:
        self.rules = rules
        self.n_rows = 0
        self.n_images = 0
        self._memo: dict[str, str | None] = {}

    def check(self, sites: list[ImageSite]) -> list[Problem]:
        """The problems of one image row's images (its sites from ``convert_row``)."""
        if not sites:
            return []
        self.n_rows += 1
        self.n_images += len(sites)
        problems = []
        if len(sites) > self.rules.max_per_example:
            problems.append(Problem(f"the example has {len(sites)} images, more than the {self.rules.max_per_example} "
                                    "an example may hold (TUNEYARD_MAX_IMAGES_PER_EXAMPLE)", param="images"))
        if self.n_rows == self.rules.max_image_examples + 1:
            problems.append(Problem(f"more than {self.rules.max_image_examples:,} examples hold images, the most a "
                                    "file may have (TUNEYARD_MAX_IMAGE_EXAMPLES)"))
        for site in sites:
            why = self._check(site.ref)
            if why is not None:
                problems.append(Problem(why, site.where, site.param))
        return problems

    def _check(self, ref: str) -> str | None:
        key = ref if len(ref) < 512 else hashlib.sha256(ref.encode()).hexdigest()
        if key in self._memo:
            return self._memo[key]
        try:
            kind, target = locate(ref, self.rules)
            if kind == "data":
                inspect(decode_data_uri(ref, self.rules.max_bytes), ref, self.rules.max_pixels)
            elif kind == "path":
                inspect(read_local(target, ref, self.rules.max_bytes), ref, self.rules.max_pixels)
            why = None
        except ImageError as e:
            why = e.message
        except OSError as e:
            why = f"image '{shown(ref)}' could not be read ({e.strerror or e})"
        if len(self._memo) < _MEMO:
            self._memo[key] = why
        return why


def fit_pixels(width: int, height: int, max_pixels: int | None, min_pixels: int | None) -> tuple[int, int]:
    """The size an image is resized to so that its pixels lie within the limits (its aspect ratio kept)."""
    n = width * height
    if max_pixels and n > max_pixels:
        scale = math.sqrt(max_pixels / n)
        return max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
    if min_pixels and n < min_pixels:
        scale = math.sqrt(min_pixels / n)
        return math.ceil(width * scale), math.ceil(height * scale)
    return width, height


class ImageStore:
    """The prepare step's images: fetched, checked, decoded, resized and stored once under ``data/images/``."""

    def __init__(self, data_dir: Path, rules: ImageRules, *, param: str, max_pixels: int | None = None,
                 min_pixels: int | None = None, runtime: Any = None) -> None:
        self.data_dir = data_dir
        # The job's RuntimeSpec (download rules, S3 endpoint): a job's process reads no TUNEYARD_* variable.
        self.runtime = runtime
        self.dir = data_dir / IMAGES_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rules = rules
        # The source's param: its secret (TUNEYARD_SOURCE_CREDENTIALS) is the one s3:// images are read with.
        self.param = param
        self.max_pixels = max_pixels
        self.min_pixels = min_pixels
        self.n_fetched = 0
        self.n_resized = 0
        self.bytes_stored = 0
        index = self.dir / INDEX_FILE
        self._index: dict[str, str] = json.loads(index.read_text()) if index.is_file() else {}
        self._limits = [max_pixels, min_pixels]

    def _key(self, ref: str) -> str:
        # The same source resized to other limits is another stored image.
        return hashlib.sha256(json.dumps([ref, self._limits, self.rules.base]).encode()).hexdigest()

    def put(self, ref: str) -> str:
        """The stored REF (``images/<sha256>.<ext>``) of ``ref``, fetching and storing it if not done yet."""
        key = self._key(ref)
        done = self._index.get(key)
        if done is not None and (self.data_dir / done).is_file():
            return done
        kind, target = locate(ref, self.rules)
        if kind == "data":
            data = decode_data_uri(ref, self.rules.max_bytes)
        elif kind == "path":
            data = read_local(target, ref, self.rules.max_bytes)
        else:
            data = self._fetch(target, ref)
        stored = self._store(data, ref)
        self._index[key] = stored
        return stored

    def save_index(self) -> None:
        """Keep the source-to-stored map, so that a prepare step run again fetches nothing twice."""
        path = self.dir / INDEX_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._index))
        tmp.replace(path)

    def _fetch(self, url: str, ref: str) -> bytes:
        from tuneyard.data.sources import SourceError, materialise
        from tuneyard.domain.spec import DataSource
        from tuneyard.settings import get_settings

        s = self.runtime or get_settings()
        with tempfile.TemporaryDirectory(dir=self.dir, prefix=".fetch-") as tmp:
            try:
                local = materialise(DataSource(path=url, param=self.param), Path(tmp),
                                    s3_endpoint_url=s.s3_endpoint_url, s3_ambient_credentials=s.s3_ambient_credentials,
                                    max_bytes=self.rules.max_bytes, allow_private_hosts=s.download_allow_private_hosts,
                                    deadline_seconds=s.download_timeout_seconds, limit_name="TUNEYARD_MAX_IMAGE_BYTES")
            except SourceError as e:
                raise ImageError(f"image '{shown(ref)}': {e.message}") from None
            self.n_fetched += 1
            return read_local(local.path, ref, self.rules.max_bytes)

    def _store(self, data: bytes, ref: str) -> str:
        from PIL import Image

        info = inspect(data, ref, self.rules.max_pixels)
        im = Image.open(io.BytesIO(data), formats=[info.format])
        try:
            im.seek(0)
            im.load()
        except Exception as e:  # the pixels do not decode: OSError (truncated), SyntaxError, zlib.error...
            raise ImageError(f"image '{shown(ref)}' does not decode ({e})") from None
        size = fit_pixels(info.width, info.height, self.max_pixels, self.min_pixels)
        resized = size != (info.width, info.height)
        if resized or info.format == "GIF":
            out_format = "PNG" if info.format == "GIF" else info.format
            frame = im.convert("RGBA" if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info and
                               out_format != "JPEG" else "RGB")
            if resized:
                frame = frame.resize(size, Image.Resampling.BICUBIC)
                self.n_resized += 1
            buf = io.BytesIO()
            frame.save(buf, format=out_format, **({"quality": 95} if out_format in ("JPEG", "WEBP") else {}))
            data = buf.getvalue()
        name = f"{IMAGES_DIR}/{hashlib.sha256(data).hexdigest()}.{STORED_EXT[info.format]}"
        path = self.data_dir / name
        if not path.is_file():
            tmp = path.with_name(f".{path.name}.partial")
            tmp.write_bytes(data)
            tmp.replace(path)
            self.bytes_stored += len(data)
        return name


def open_image(data_dir: str | Path, ref: str) -> Any:
    """A stored image (``images/<sha256>.<ext>`` under the job's ``data/``), decoded, in RGB mode."""
    from PIL import Image

    if not STORED_REF.match(ref):
        raise ValueError(f"'{ref}' is not a stored image reference (images/<sha256>.<ext>)")
    with Image.open(Path(data_dir) / ref) as im:
        return im.convert("RGB")


def rewrite_refs(row: dict, stored: dict[str, str]) -> dict:
    """``row`` with each image part's REF replaced by its stored one (``stored``: source REF -> stored REF)."""
    out = dict(row)
    for key in ("messages", "prompt", "chosen", "rejected"):
        if key not in row:
            continue
        out[key] = [
            {**m, "content": [{**p, "image": stored[p["image"]]} if p.get("type") == "image" else p
                              for p in m["content"]]} if isinstance(m.get("content"), list) else m
            for m in row[key]]
    return out
