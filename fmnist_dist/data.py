"""Fashion-MNIST: find the four IDX files, verify them, load them; split and shard the training set.

Every file is checked (IDX magic, dimensions, payload size, SHA-256 of the decompressed bytes);
anything wrong is a DataError naming the file and what was expected. There is no synthetic fallback.
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import math
import os
import shutil
import struct
import sys
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass

import numpy as np

from .config import DATA_URL, format_shape
from .errors import DataError

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
DEBIAN_PACKAGE = "dataset-fashion-mnist"
ENV_VAR = "FMNIST_DATA_DIR"

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
SHAPES = {
    "train_images": (60000, 28, 28),
    "train_labels": (60000,),
    "test_images": (10000, 28, 28),
    "test_labels": (10000,),
}
# SHA-256 of the decompressed IDX files. Debian's .gz files are recompressed (their bytes differ
# from upstream's), but both decompress to exactly these bytes.
SHA256 = {
    "train_images": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train_labels": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "test_images": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "test_labels": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
# Sizes of the upstream .gz files (Debian's recompressed ones are 24 bytes smaller). A download
# stops past twice the largest: no Fashion-MNIST file can be that big, whatever its compression.
ORIGINAL_GZ_SIZES = {"train_images": 26421880, "train_labels": 29515, "test_images": 4422102, "test_labels": 5148}
DOWNLOAD_LIMIT = 2 * max(ORIGINAL_GZ_SIZES.values())
NUM_CLASSES = 10
_CHUNK = 1 << 20



@dataclass(frozen=True)
class FashionMNIST:
    x_train: np.ndarray  # uint8 (60000, 28, 28)
    y_train: np.ndarray  # uint8 (60000,)
    x_test: np.ndarray   # uint8 (10000, 28, 28)
    y_test: np.ndarray   # uint8 (10000,)
    source: str          # directory loaded from, or "URL (downloaded to DIR)"


# ---------------------------------------------------------------- finding the files

def default_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "fmnist-dist", "fashion-mnist")


def keras_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".keras", "datasets", "fashion-mnist")


def candidate_dirs(data_dir: str | None) -> list[tuple[str, str]]:
    """(label, path) of the directories to search, in order. An explicit data_dir is the only one."""
    if data_dir:
        return [("data.dir / --data-dir", data_dir)]
    dirs = []
    if os.environ.get(ENV_VAR):
        dirs.append((f"${ENV_VAR}", os.environ[ENV_VAR]))
    # DEBIAN_DIR is read here, at call time, so tests can point it elsewhere.
    dirs.append((f"Debian package {DEBIAN_PACKAGE}", DEBIAN_DIR))
    dirs.append(("Keras cache", keras_cache_dir()))
    return dirs


def _find_files(directory: str, label: str) -> dict[str, str] | None:
    """Paths of the four files in directory (raw NAME preferred over NAME.gz); None if there are
    none; DataError if only some are there (files from different directories are never mixed)."""
    found = {}
    for key, name in FILES.items():
        for candidate in (name, name + ".gz"):
            path = os.path.join(directory, candidate)
            if os.path.isfile(path):
                found[key] = path
                break
    if not found:
        return None
    if len(found) < len(FILES):
        missing = [FILES[k] for k in FILES if k not in found]
        present = [os.path.basename(found[k]) for k in FILES if k in found]
        raise DataError(
            f"{directory} ({label}) has only some of the Fashion-MNIST files: missing "
            f"{', '.join(missing)} (raw or .gz); present: {', '.join(present)}. "
            "Add the missing files or remove the directory (files are never mixed across directories).")
    return found


def _not_found_reason(directory: str) -> str:
    return "no such directory" if not os.path.isdir(directory) else "directory holds none of the files"


def load_fashion_mnist(data_dir: str | None = None, download: bool = False, cache_dir: str | None = None,
                       url: str = DATA_URL, progress: bool = True) -> FashionMNIST:
    """Load and verify Fashion-MNIST from the first directory that has it (see candidate_dirs),
    downloading into cache_dir only when download is true and no local copy exists."""
    found, directory, searched = _search(data_dir)
    if found:
        return _load_verified(found, source=directory)
    cache_dir = cache_dir or default_cache_dir()
    if download:
        try:
            return _load_or_download(cache_dir, url, progress)
        except DataError as e:
            searched.append(f"download from {url} into {cache_dir}: failed")
            raise DataError(f"{e}\n{_not_found_message(searched, url, download_tried=True)}") from e
    searched.append(f"download into {cache_dir}: not tried (data.download is false)")
    raise DataError(_not_found_message(searched, url))


def check_quickly(data_dir: str | None = None, download: bool = False, cache_dir: str | None = None,
                  url: str = DATA_URL) -> str | None:
    """What load_fashion_mnist will find, checked in milliseconds without reading it all: the files
    are there, each raw file has the expected size and IDX header, each .gz file's IDX header and
    gzip trailer (the decompressed size) are right. A file failing a cheap test is read in full,
    so the DataError is load_fashion_mnist's own. Returns the directory checked, or None when the
    files are still to be downloaded. A file of the right size with wrong bytes passes here (the
    full SHA-256 check of load_fashion_mnist finds it)."""
    found, directory, searched = _search(data_dir)
    if not found:
        cache_dir = cache_dir or default_cache_dir()
        if not download:
            searched.append(f"download into {cache_dir}: not tried (data.download is false)")
            raise DataError(_not_found_message(searched, url))
        found, directory = _cached_downloads(cache_dir), cache_dir
        if len(found) < len(FILES):
            return None
    for key, path in found.items():
        if not _looks_right(path, SHAPES[key]):
            read_idx(path, SHAPES[key], SHA256[key])
    return directory


def _looks_right(path: str, shape: tuple[int, ...]) -> bool:
    """The cheap tests of check_quickly: size (raw) or gzip trailer (.gz), and the IDX header."""
    expected_size = _header_size(shape) + math.prod(shape)
    try:
        with open(path, "rb") as f:
            if not path.endswith(".gz"):
                if os.fstat(f.fileno()).st_size != expected_size:
                    return False
                header = f.read(_header_size(shape))
            else:
                # ISIZE, the last 4 bytes: the decompressed size mod 2**32 (of the last member only, so a
                # valid multi-member file fails this and is read in full).
                f.seek(max(0, os.fstat(f.fileno()).st_size - 4))
                if int.from_bytes(f.read(4), "little") != expected_size % 2**32:
                    return False
                f.seek(0)
                with gzip.open(f) as stream:
                    header = stream.read(_header_size(shape))
        _check_header(path, bytearray(header), shape)
    except (OSError, EOFError, zlib.error, DataError):
        return False
    return True


def _search(data_dir: str | None) -> tuple[dict[str, str] | None, str | None, list[str]]:
    """(paths of the four files, their directory, the places searched before it); (None, None,
    searched) when no place has them; DataError when data_dir is given and lacks them."""
    searched = []
    for label, directory in candidate_dirs(data_dir):
        found = _find_files(directory, label)
        if found:
            return found, directory, searched
        searched.append(f"{directory} ({label}): {_not_found_reason(directory)}")
    if data_dir:
        raise DataError(f"Fashion-MNIST not found in {data_dir} (data.dir / --data-dir): "
                        f"{_not_found_reason(data_dir)}. Expected {_expected_names()}. "
                        "Only this directory is searched when data.dir is set; unset it to search "
                        f"${ENV_VAR}, {DEBIAN_DIR} and the Keras cache.")
    if not os.environ.get(ENV_VAR):
        searched.insert(0, f"${ENV_VAR} (not set)")
    return None, None, searched


def _load_or_download(cache_dir: str, url: str, progress: bool) -> FashionMNIST:
    cached = _cached_downloads(cache_dir)
    if len(cached) == len(FILES):
        return _load_verified(cached, source=cache_dir)
    download_dataset(url, cache_dir, progress)
    return _load_verified(_cached_downloads(cache_dir), source=f"{url} (downloaded to {cache_dir})")


def _cached_downloads(directory: str) -> dict[str, str]:
    """The .gz files already in the download cache; a partial set is fine (an interrupted download
    resumes file by file)."""
    paths = {key: os.path.join(directory, name + ".gz") for key, name in FILES.items()}
    return {key: path for key, path in paths.items() if os.path.isfile(path)}


def _expected_names() -> str:
    return ", ".join(FILES.values()) + " (each raw or .gz)"


def _not_found_message(searched: list[str], url: str, download_tried: bool = False) -> str:
    places = "\n".join(f"  - {s}" for s in searched)
    ways = [f"--data-dir DIR (or data.dir, or ${ENV_VAR}) naming a directory with {_expected_names()}",
            f"the Keras cache {keras_cache_dir()}: python -c 'import tensorflow as tf; "
            "tf.keras.datasets.fashion_mnist.load_data()' fills it (on a login node with network access)"]
    if not download_tried:
        ways.append(f"set data.download: true (or --set data.download=true) to download it from {url}")
    ways.append(f"on Debian/Ubuntu, as root: apt-get install {DEBIAN_PACKAGE}   (installs it in {DEBIAN_DIR})")
    return (f"Fashion-MNIST not found. Searched:\n{places}\n"
            "Get the data in one of these ways:\n" + "\n".join(f"  - {w}" for w in ways))


def _load_verified(paths: dict[str, str], source: str) -> FashionMNIST:
    arrays = {key: read_idx(paths[key], SHAPES[key], SHA256[key]) for key in FILES}
    for key in ("train_labels", "test_labels"):
        _check_labels(paths[key], arrays[key])
    return FashionMNIST(arrays["train_images"], arrays["train_labels"],
                        arrays["test_images"], arrays["test_labels"], source)


def _check_labels(path: str, labels: np.ndarray) -> None:
    if labels.size and labels.max() >= NUM_CLASSES:
        raise DataError(f"{path}: labels must be 0..{NUM_CLASSES - 1}, found {int(labels.max())}")


# ---------------------------------------------------------------- reading IDX files

def read_idx(path: str, expected_shape: tuple[int, ...], expected_sha256: str | None) -> np.ndarray:
    """A verified uint8 IDX file (raw, or gzip if the name ends in .gz) as an array of
    expected_shape. expected_sha256 is of the decompressed bytes; None skips that check."""
    expected_shape = tuple(expected_shape)
    expected_size = _header_size(expected_shape) + math.prod(expected_shape)
    compressed = path.endswith(".gz")
    payload = _read_gzip(path, expected_size) if compressed else _read_raw(path, expected_shape)
    what = "decompressed " if compressed else ""
    _check_header(path, payload, expected_shape)
    if len(payload) > expected_size:  # _read_gzip stopped one byte past the expected size
        raise DataError(f"{path}: decompresses to more than {expected_size} bytes, expected exactly {expected_size} "
                        "(stopped there; the file is corrupt or not this Fashion-MNIST file)")
    if len(payload) != expected_size:
        raise DataError(f"{path}: {what}size is {len(payload)} bytes, expected {expected_size} "
                        f"(the file is truncated or corrupt)")
    if expected_sha256 is not None:
        actual = hashlib.sha256(payload).hexdigest()
        if actual != expected_sha256:
            raise DataError(f"{path}: SHA-256 of the {what}data is {actual}, expected {expected_sha256} "
                            "(the file is corrupt or not the original Fashion-MNIST)")
    return np.frombuffer(payload, dtype=np.uint8, offset=_header_size(expected_shape)).reshape(expected_shape)


def _header_size(shape: tuple[int, ...]) -> int:
    return 4 + 4 * len(shape)


def _read_raw(path: str, expected_shape: tuple[int, ...]) -> bytearray:
    # A bytearray (not bytes) so the arrays made over it with np.frombuffer are writable.
    expected_size = _header_size(expected_shape) + math.prod(expected_shape)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > expected_size:  # refused unread (but its header, which may tell what it is)
                _check_header(path, bytearray(f.read(_header_size(expected_shape))), expected_shape)
                raise DataError(f"{path}: size is {size} bytes, expected {expected_size} "
                                "(too large for this Fashion-MNIST file; not read)")
            payload = bytearray(size)
            n = f.readinto(payload)
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from e
    return payload if n == len(payload) else payload[:n]


def _read_gzip(path: str, expected_size: int) -> bytearray:
    """At most expected_size + 1 decompressed bytes (one more tells the file is too large): a
    decompression bomb costs no more memory than the real file."""
    payload = bytearray()
    try:
        with gzip.open(path, "rb") as f:
            while len(payload) <= expected_size and (chunk := f.read(min(_CHUNK, expected_size + 1 - len(payload)))):
                payload += chunk
    except EOFError as e:
        raise DataError(f"{path}: gzip stream ends early after {len(payload)} decompressed bytes, "
                        f"expected {expected_size} (the file is truncated)") from e
    except (gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: corrupt gzip data after {len(payload)} decompressed bytes "
                        f"(expected {expected_size}): {e}") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from e
    return payload


def _check_header(path: str, payload: bytearray, expected_shape: tuple[int, ...]) -> None:
    ndim = len(expected_shape)
    expected_magic = 0x0800 | ndim  # 0x08: unsigned bytes; low byte: number of dimensions
    if len(payload) >= 4:
        magic = int.from_bytes(payload[:4], "big")
        if magic != expected_magic:
            hint = " (this looks gzip-compressed: name it .gz)" if payload[:2] == b"\x1f\x8b" else ""
            raise DataError(f"{path}: IDX magic number is 0x{magic:08x}, expected 0x{expected_magic:08x} "
                            f"(uint8, {ndim} dimensions){hint}")
    if len(payload) >= _header_size(expected_shape):
        dims = struct.unpack(f">{ndim}I", payload[4:_header_size(expected_shape)])
        if dims != expected_shape:
            raise DataError(f"{path}: IDX dimensions are {format_shape(dims, ' x ')}, "
                            f"expected {format_shape(expected_shape, ' x ')}")


# ---------------------------------------------------------------- downloading

def download_dataset(url: str, dest_dir: str, progress: bool = True) -> str:
    """Download the four .gz files missing from dest_dir from the base URL url; each is verified
    in a temporary directory and only then renamed into dest_dir. Returns dest_dir."""
    try:
        os.makedirs(dest_dir, exist_ok=True)
        if not os.access(dest_dir, os.W_OK):
            raise PermissionError("not writable")
    except OSError as e:
        raise DataError(f"cannot use the download directory {dest_dir}: {e}") from e
    present = _cached_downloads(dest_dir)
    for key, name in FILES.items():
        if key not in present:
            _download_one(url.rstrip("/") + "/" + name + ".gz", key, dest_dir, progress)
    return dest_dir


def _download_one(file_url: str, key: str, dest_dir: str, progress: bool) -> None:
    file_name = FILES[key] + ".gz"
    # A private temporary directory per process: several ranks may download into one cache at once.
    tmp_dir = tempfile.mkdtemp(prefix=".download-", dir=dest_dir)
    try:
        tmp_path = os.path.join(tmp_dir, file_name)
        _fetch(file_url, tmp_path, progress)
        try:
            read_idx(tmp_path, SHAPES[key], SHA256[key])
        except DataError as e:
            raise DataError(f"download of {file_url} failed verification: {e}") from e
        os.replace(tmp_path, os.path.join(dest_dir, file_name))
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _fetch(file_url: str, dest_path: str, progress: bool) -> None:
    """Stream file_url into dest_path, refusing more than DOWNLOAD_LIMIT bytes (announced or received)."""
    name = os.path.basename(dest_path)
    done, total, shown = 0, None, False
    try:
        with urllib.request.urlopen(file_url, timeout=60) as response, open(dest_path, "wb") as out:
            total = _content_length(response, file_url)
            shown = progress
            if progress:
                _show_progress(name, done, total)
            while chunk := response.read(_CHUNK):
                done += len(chunk)
                if done > DOWNLOAD_LIMIT:
                    raise DataError(f"download of {file_url} failed: more than {DOWNLOAD_LIMIT} bytes received, "
                                    "more than any Fashion-MNIST file; stopped")
                out.write(chunk)
                if progress:
                    _show_progress(name, done, total)
    except urllib.error.HTTPError as e:
        raise DataError(f"download of {file_url} failed: HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise DataError(f"download of {file_url} failed: {e.reason}") from e
    except (OSError, http.client.HTTPException) as e:
        raise DataError(f"download of {file_url} failed: {type(e).__name__}: {e}") from e
    finally:
        if shown:
            sys.stderr.write("\n")  # end the progress line
            sys.stderr.flush()
    if total is not None and done != total:
        raise DataError(f"download of {file_url} failed: received {done} bytes, expected {total}")


def _content_length(response, file_url: str) -> int | None:
    try:
        total = int(response.headers.get("Content-Length") or 0) or None
    except ValueError:
        total = None  # a malformed header: the bytes received are counted anyway
    if total is not None and total > DOWNLOAD_LIMIT:
        raise DataError(f"download of {file_url} failed: the server announces {total} bytes (Content-Length), "
                        f"more than any Fashion-MNIST file (limit {DOWNLOAD_LIMIT}); not downloaded")
    return total


def _show_progress(name: str, done: int, total: int | None) -> None:
    if total:
        text = f"downloading {name}: {done}/{total} bytes ({100 * done // total}%)"
    else:
        text = f"downloading {name}: {done} bytes"
    sys.stderr.write("\r" + text)
    sys.stderr.flush()


# ---------------------------------------------------------------- splitting and sharding

def split_train_val(n_train: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx): a seeded random split of range(n_train), both sorted, disjoint."""
    if not 0 <= val_size < n_train:
        raise DataError(f"validation size {val_size} must be in [0, {n_train - 1}] "
                        f"for {n_train} training examples")
    perm = np.random.default_rng(_seed_words(seed, _SPLIT_STREAM)).permutation(n_train)
    return np.sort(perm[val_size:]), np.sort(perm[:val_size])


def steps_per_epoch(n_examples: int, world_size: int, batch_size: int) -> int:
    """Whole global batches per epoch: floor(n_examples / (world_size * batch_size))."""
    if world_size < 1 or batch_size < 1:
        raise DataError(f"world size ({world_size}) and batch size ({batch_size}) must be at least 1")
    steps = n_examples // (world_size * batch_size)
    if steps == 0:
        raise DataError(f"{n_examples} training examples are fewer than one global batch "
                        f"({world_size} ranks x batch size {batch_size} = {world_size * batch_size}); "
                        "lower train.batch_size, use fewer ranks, or reduce data.val_size")
    return steps


def epoch_order(train_idx: np.ndarray, epoch: int, seed: int) -> np.ndarray:
    """The epoch's global order of training examples: the same permutation on every rank."""
    perm = np.random.default_rng(_seed_words(seed, _SHUFFLE_STREAM, epoch)).permutation(len(train_idx))
    return np.asarray(train_idx)[perm]


def alternating_flips(shard: np.ndarray, n_examples: int, seed: int, epoch: int) -> np.ndarray:
    """Which of the shard's examples are mirrored in this (1-based) epoch: a coin per example, fixed by
    the seed, decides the first epoch, and each later epoch flips the previous one, so any two
    consecutive epochs show every image both ways. A function of the example, not of the rank or
    position: a resumed or resized run mirrors the same images."""
    first = np.random.default_rng(_seed_words(seed, _FLIP_STREAM)).random(n_examples) < 0.5
    return first[np.asarray(shard)] ^ bool((epoch - 1) % 2)


def epoch_shard(train_idx: np.ndarray, epoch: int, seed: int, rank: int, world_size: int,
                batch_size: int, start: int = 0, max_steps: int | None = None) -> np.ndarray:
    """This rank's examples for the epoch, in step order.

    The epoch's global order is consumed one global batch (world_size x batch_size) per step, and
    rank r takes the r-th slice of each global batch. So after s steps exactly the first
    start + s * world_size * batch_size examples of the order are used, whatever the world size:
    a resumed run continues from `start` (even with a different number of ranks). The leftover
    (< one global batch) sits out this epoch, a different set each epoch."""
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside 0..{world_size - 1}")
    remaining = epoch_order(train_idx, epoch, seed)[start:]
    if start:       # resumed near the epoch's end, perhaps on more ranks: the rest may be no global batch
        steps = len(remaining) // (world_size * batch_size)
    else:
        steps = steps_per_epoch(len(remaining), world_size, batch_size)
    if max_steps is not None:
        steps = min(steps, max_steps)
    batches = remaining[: steps * world_size * batch_size].reshape(steps, world_size, batch_size)
    return batches[:, rank, :].reshape(-1)


# Separate random streams for the split, the shuffles and the flips. Without the stream word, [seed]
# and [seed, 0] would seed identical generators (SeedSequence pads with zeros), so epoch 0's shuffle
# would repeat the split's permutation.
_SPLIT_STREAM, _SHUFFLE_STREAM, _FLIP_STREAM = 0, 1, 2


def _seed_words(*values: int) -> list[int]:
    if any(v < 0 for v in values):
        raise DataError(f"seed and epoch must be non-negative, got {values}")
    return list(values)


def index_digest(indices: np.ndarray) -> str:
    """SHA-256 of an index array as int64: lets a reader re-derive and check a rank's shard."""
    return hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()
