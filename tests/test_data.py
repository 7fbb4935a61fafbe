"""fmnist_dist.data on real files: IDX parsing and its errors, the look-up order, the real
Fashion-MNIST (gzip and raw), downloading from a local HTTP server, the split and the shards."""
import contextlib
import functools
import gzip
import hashlib
import http.server
import os
import shutil
import struct
import subprocess
import sys
import threading
import zlib

import numpy as np
import pytest

from conftest import ROOT, unavailable
from fmnist_dist import data

REAL_DIR = data.DEBIAN_DIR  # captured before any test points data.DEBIAN_DIR elsewhere
GZ_NAMES = [name + ".gz" for name in data.FILES.values()]


# ---------------------------------------------------------------- helpers

def idx_bytes(array: np.ndarray, magic: int | None = None, dims: tuple | None = None) -> bytes:
    dims = array.shape if dims is None else dims
    magic = 0x0800 | len(dims) if magic is None else magic
    return struct.pack(f">I{len(dims)}I", magic, *dims) + array.astype(np.uint8).tobytes()


def write(path, payload: bytes, gz: bool = False) -> str:
    with open(path, "wb") as f:
        f.write(gzip.compress(payload) if gz else payload)
    return str(path)


def sha(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def small_images() -> np.ndarray:
    return np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)


def require_real_data() -> None:
    if not os.path.isdir(REAL_DIR):
        unavailable(f"{REAL_DIR} absent (apt-get install {data.DEBIAN_PACKAGE}, e.g. via scripts/setup.sh)")


def link_real_files(directory, names=GZ_NAMES):
    """A dataset directory made of symlinks to the real Debian files (cheap, and really verified)."""
    os.makedirs(directory, exist_ok=True)
    for name in names:
        os.symlink(os.path.join(REAL_DIR, name), os.path.join(directory, name))
    return str(directory)


@pytest.fixture(scope="module")
def real():
    require_real_data()
    return data.load_fashion_mnist(data_dir=REAL_DIR)


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No $FMNIST_DATA_DIR, the Debian dir and $HOME (so the Keras cache) pointing at empty tmp paths."""
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(data, "DEBIAN_DIR", str(tmp_path / "no-debian"))
    return tmp_path


def keras_dir(tmp_path) -> str:
    return str(tmp_path / "home" / ".keras" / "datasets" / "fashion-mnist")


def assert_same(a: data.FashionMNIST, b: data.FashionMNIST) -> None:
    for field in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


# ---------------------------------------------------------------- IDX parsing

@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_valid(tmp_path, gz):
    images, labels = small_images(), np.array([3, 1, 9], dtype=np.uint8)
    suffix = ".gz" if gz else ""
    img_path = write(tmp_path / f"img{suffix}", idx_bytes(images), gz)
    lab_path = write(tmp_path / f"lab{suffix}", idx_bytes(labels), gz)

    got = data.read_idx(img_path, (3, 4, 5), sha(idx_bytes(images)))
    assert got.dtype == np.uint8 and got.shape == (3, 4, 5)
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal(data.read_idx(lab_path, (3,), None), labels)
    got[0, 0, 0] = 7  # writable, so callers may normalise in place


def test_read_idx_wrong_magic(tmp_path):
    path = write(tmp_path / "img", idx_bytes(small_images(), magic=0x0801))
    with pytest.raises(data.DataError) as e:
        data.read_idx(path, (3, 4, 5), None)
    assert str(e.value) == (f"{path}: IDX magic number is 0x00000801, expected 0x00000803 "
                            "(uint8, 3 dimensions)")


def test_read_idx_gzip_without_gz_name(tmp_path):
    path = write(tmp_path / "img", idx_bytes(small_images()), gz=True)
    with pytest.raises(data.DataError, match=r"expected 0x00000803 .*looks gzip-compressed: name it \.gz"):
        data.read_idx(path, (3, 4, 5), None)


def test_read_idx_wrong_dims(tmp_path):
    path = write(tmp_path / "img", idx_bytes(np.zeros((4, 4, 5))))
    with pytest.raises(data.DataError) as e:
        data.read_idx(path, (3, 4, 5), None)
    assert str(e.value) == f"{path}: IDX dimensions are 4 x 4 x 5, expected 3 x 4 x 5"


def test_read_idx_truncated_raw(tmp_path):
    path = write(tmp_path / "img", idx_bytes(small_images())[:-10])  # 16-byte header + 60 - 10
    with pytest.raises(data.DataError) as e:
        data.read_idx(path, (3, 4, 5), None)
    assert str(e.value) == f"{path}: size is 66 bytes, expected 76 (the file is truncated or corrupt)"


def test_read_idx_header_only_part(tmp_path):
    path = write(tmp_path / "img", b"\x00\x00")
    with pytest.raises(data.DataError, match=r"size is 2 bytes, expected 76"):
        data.read_idx(path, (3, 4, 5), None)


def test_read_idx_trailing_bytes(tmp_path):
    path = write(tmp_path / "img.gz", idx_bytes(small_images()) + b"extra", gz=True)
    with pytest.raises(data.DataError) as e:
        data.read_idx(path, (3, 4, 5), None)
    assert str(e.value) == (f"{path}: decompresses to more than 76 bytes, expected exactly 76 "
                            "(stopped there; the file is corrupt or not this Fashion-MNIST file)")


def test_read_idx_truncated_gzip(tmp_path):
    payload = idx_bytes(np.random.default_rng(0).integers(0, 256, (30, 28, 28)))
    path = write(tmp_path / "img.gz", gzip.compress(payload)[:-100])
    with pytest.raises(data.DataError) as e:
        data.read_idx(path, (30, 28, 28), sha(payload))
    message = str(e.value)
    assert message.startswith(f"{path}: gzip stream ends early after ")
    assert message.endswith(f" decompressed bytes, expected {len(payload)} (the file is truncated)")


def test_read_idx_not_gzip(tmp_path):
    path = write(tmp_path / "img.gz", idx_bytes(small_images()))  # raw bytes under a .gz name
    with pytest.raises(data.DataError, match=rf"^{path}: corrupt gzip data after 0 decompressed bytes "
                                             r"\(expected 76\): Not a gzipped file"):
        data.read_idx(path, (3, 4, 5), None)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_wrong_checksum(tmp_path, gz):
    payload = idx_bytes(small_images())
    path = write(tmp_path / ("img.gz" if gz else "img"), payload, gz)
    wanted = "0" * 64
    with pytest.raises(data.DataError) as e:
        data.read_idx(path, (3, 4, 5), wanted)
    what = "decompressed " if gz else ""
    assert str(e.value) == (f"{path}: SHA-256 of the {what}data is {sha(payload)}, expected {wanted} "
                            "(the file is corrupt or not the original Fashion-MNIST)")


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(data.DataError, match=r"nope: cannot read: .*No such file"):
        data.read_idx(str(tmp_path / "nope"), (3,), None)


# ---------------------------------------------------------------- size limits

def test_raw_file_larger_than_expected_is_refused_unread(tmp_path):
    """A 100 GB (sparse) file with a valid header: refused from its size, in no time, without reading it."""
    path = write(tmp_path / "img", idx_bytes(small_images()))
    os.truncate(path, 100 * 10**9)
    with pytest.raises(data.DataError) as e:
        data.read_idx(path, (3, 4, 5), None)
    assert str(e.value) == (f"{path}: size is 100000000000 bytes, expected 76 "
                            "(too large for this Fashion-MNIST file; not read)")


def gzip_bomb(path, megabytes: int = 400) -> str:
    """A valid train-images header followed by `megabytes` MB of zeros, as one gzip member (~1000:1)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    with open(path, "wb") as out:
        out.write(packer.compress(struct.pack(">4I", 0x0803, 60000, 28, 28)))
        zeros = bytes(1 << 20)
        for _ in range(megabytes):
            out.write(packer.compress(zeros))
        out.write(packer.flush())
    return str(path)


# VmHWM, not getrusage's ru_maxrss: that one keeps the high-water mark of the forked parent (pytest,
# with TensorFlow loaded by earlier tests) across exec.
PEAK_RSS = """import sys
from fmnist_dist import data
try:
    data.read_idx(sys.argv[1], data.SHAPES["train_images"], None)
except data.DataError as e:
    print(e)
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(int(hwm.split()[1]) * 1024)
"""


def read_in_fresh_process(path: str) -> tuple[str, int]:
    """(what read_idx says, the process's peak RSS in bytes) of reading path as train images."""
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, path], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr
    *message, peak = proc.stdout.splitlines()
    return "\n".join(message), int(peak)


def test_gzip_bomb_stops_at_the_expected_size(tmp_path):
    """400 MB of zeros in a 0.4 MB .gz: decompression stops one byte past the 47 MB of the real
    file, and the process peaks no higher than reading the real file does."""
    require_real_data()
    bomb = gzip_bomb(tmp_path / "train-images-idx3-ubyte.gz")
    assert os.path.getsize(bomb) < 1 << 20
    expected = 16 + 60000 * 28 * 28
    message, bomb_peak = read_in_fresh_process(bomb)
    assert message == (f"{bomb}: decompresses to more than {expected} bytes, expected exactly {expected} "
                       "(stopped there; the file is corrupt or not this Fashion-MNIST file)")
    _, real_peak = read_in_fresh_process(os.path.join(REAL_DIR, "train-images-idx3-ubyte.gz"))
    print(f"peak RSS: gzip bomb {bomb_peak / 2**20:.0f} MiB, real file {real_peak / 2**20:.0f} MiB")
    assert bomb_peak < real_peak + 16 * 2**20, (bomb_peak, real_peak)
    assert bomb_peak < 200 * 2**20  # the bomb decompresses to 400 MiB


# ---------------------------------------------------------------- the quick check before Horovod

def test_check_quickly_passes_the_real_data(real, isolated):
    assert data.check_quickly(REAL_DIR) == REAL_DIR
    raw_dir = isolated / "raw"
    raw_dir.mkdir()
    for key, name in data.FILES.items():
        (raw_dir / name).write_bytes(idx_bytes(getattr(real, {"train_images": "x_train", "train_labels": "y_train",
                                                              "test_images": "x_test", "test_labels": "y_test"}[key])))
    assert data.check_quickly(str(raw_dir)) == str(raw_dir)


def test_check_quickly_gives_the_full_checks_error(isolated):
    """A truncated .gz (its gzip trailer is wrong), a raw file cut short, one too large: the error
    is read_idx's own, as the full load would give it."""
    require_real_data()
    directory = link_real_files(isolated / "d", GZ_NAMES[1:])
    gz = os.path.join(directory, GZ_NAMES[0])
    with open(os.path.join(REAL_DIR, GZ_NAMES[0]), "rb") as f:
        write(gz, f.read()[:10_000_000])
    with pytest.raises(data.DataError, match=rf"^{gz}: gzip stream ends early after \d+ decompressed bytes, "
                                             r"expected 47040016 \(the file is truncated\)$"):
        data.check_quickly(directory)
    os.remove(gz)
    raw = os.path.join(directory, "train-images-idx3-ubyte")
    write(raw, idx_bytes(np.zeros((60000, 28, 28)))[:5000])
    with pytest.raises(data.DataError, match=rf"^{raw}: size is 5000 bytes, expected 47040016 "):
        data.check_quickly(directory)
    os.truncate(raw, 10**12)                                   # sparse: 1 TB, valid header
    with pytest.raises(data.DataError, match=rf"^{raw}: size is 1000000000000 bytes, expected 47040016 "
                                             r"\(too large for this Fashion-MNIST file; not read\)$"):
        data.check_quickly(directory)


def test_check_quickly_reads_a_valid_multi_member_gzip_in_full(isolated):
    """A valid .gz of two members carries the last member's size in its trailer: the cheap test
    fails, the full read passes it."""
    require_real_data()
    directory = link_real_files(isolated / "d", [n for n in GZ_NAMES if not n.startswith("t10k-labels")])
    with gzip.open(os.path.join(REAL_DIR, "t10k-labels-idx1-ubyte.gz")) as f:
        labels = f.read()
    write(os.path.join(directory, "t10k-labels-idx1-ubyte.gz"),
          gzip.compress(labels[:4000]) + gzip.compress(labels[4000:]))
    assert data.check_quickly(directory) == directory


def test_check_quickly_leaves_wrong_bytes_to_the_full_load(isolated):
    """Same size, one byte changed: too costly to find here (the full SHA-256 check finds it)."""
    require_real_data()
    directory = link_real_files(isolated / "d", [n for n in GZ_NAMES if not n.startswith("t10k-labels")])
    with gzip.open(os.path.join(REAL_DIR, "t10k-labels-idx1-ubyte.gz")) as f:
        labels = bytearray(f.read())
    labels[5000] = (labels[5000] + 1) % 10
    write(os.path.join(directory, "t10k-labels-idx1-ubyte"), bytes(labels))
    assert data.check_quickly(directory) == directory
    with pytest.raises(data.DataError, match="SHA-256 of the data is"):
        data.load_fashion_mnist(directory)


def test_check_quickly_where_nothing_is_found(isolated):
    cache = str(isolated / "cache")
    with pytest.raises(data.DataError, match=r"^Fashion-MNIST not found\. Searched:\n"):
        data.check_quickly(cache_dir=cache)
    assert data.check_quickly(download=True, cache_dir=cache) is None   # the download comes later
    with pytest.raises(data.DataError, match=r"Fashion-MNIST not found in .*missing \(data.dir / --data-dir\)"):
        data.check_quickly(str(isolated / "missing"), download=True)     # data.dir is the only place


# ---------------------------------------------------------------- look-up order

def test_candidate_dirs(isolated, monkeypatch):
    debian, keras = str(isolated / "no-debian"), keras_dir(isolated)
    assert data.candidate_dirs(None) == [("Debian package dataset-fashion-mnist", debian),
                                         ("Keras cache", keras)]
    monkeypatch.setenv("FMNIST_DATA_DIR", "/env/dir")
    assert [p for _, p in data.candidate_dirs(None)] == ["/env/dir", debian, keras]
    assert data.candidate_dirs(None)[0] == ("$FMNIST_DATA_DIR", "/env/dir")
    assert data.candidate_dirs("/explicit") == [("data.dir / --data-dir", "/explicit")]


def test_lookup_env_first_then_debian_then_keras(isolated, monkeypatch):
    require_real_data()
    env_dir = link_real_files(isolated / "env")
    debian = link_real_files(isolated / "no-debian")
    keras = link_real_files(keras_dir(isolated))

    monkeypatch.setenv("FMNIST_DATA_DIR", env_dir)
    assert data.load_fashion_mnist().source == env_dir
    monkeypatch.setenv("FMNIST_DATA_DIR", str(isolated / "empty-env"))  # set but absent: next place
    assert data.load_fashion_mnist().source == debian
    monkeypatch.delenv("FMNIST_DATA_DIR")
    assert data.load_fashion_mnist().source == debian
    shutil.rmtree(debian)
    assert data.load_fashion_mnist().source == keras


def test_explicit_data_dir_is_the_only_place(isolated, monkeypatch):
    require_real_data()
    monkeypatch.setenv("FMNIST_DATA_DIR", link_real_files(isolated / "env"))
    given = link_real_files(isolated / "given")
    assert data.load_fashion_mnist(data_dir=given).source == given

    missing = str(isolated / "missing")
    with pytest.raises(data.DataError) as e:
        data.load_fashion_mnist(data_dir=missing, download=True)
    message = str(e.value)
    assert message.startswith(f"Fashion-MNIST not found in {missing} (data.dir / --data-dir): "
                              "no such directory.")
    assert "train-images-idx3-ubyte" in message and "Only this directory is searched" in message


def test_partial_directory_is_an_error_not_a_mix(isolated, monkeypatch):
    require_real_data()
    partial = link_real_files(isolated / "partial", GZ_NAMES[:1] + GZ_NAMES[3:])
    link_real_files(isolated / "no-debian")  # complete, but must not be used to fill the gaps
    monkeypatch.setenv("FMNIST_DATA_DIR", partial)
    with pytest.raises(data.DataError) as e:
        data.load_fashion_mnist()
    assert str(e.value).startswith(
        f"{partial} ($FMNIST_DATA_DIR) has only some of the Fashion-MNIST files: missing "
        "train-labels-idx1-ubyte, t10k-images-idx3-ubyte (raw or .gz); present: "
        "train-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz.")


def test_corrupt_file_is_an_error_not_a_fallback(isolated, monkeypatch):
    require_real_data()
    env_dir = link_real_files(isolated / "env", [n for n in GZ_NAMES if not n.startswith("t10k-labels")])
    with open(os.path.join(REAL_DIR, "t10k-labels-idx1-ubyte.gz"), "rb") as f:
        write(os.path.join(env_dir, "t10k-labels-idx1-ubyte.gz"), f.read()[:2000])
    link_real_files(isolated / "no-debian")
    monkeypatch.setenv("FMNIST_DATA_DIR", env_dir)
    with pytest.raises(data.DataError, match=r"t10k-labels-idx1-ubyte\.gz: gzip stream ends early after "
                                             r"\d+ decompressed bytes, expected 10008"):
        data.load_fashion_mnist()


def test_nothing_anywhere_lists_every_place(isolated):
    cache = str(isolated / "cache")
    with pytest.raises(data.DataError) as e:
        data.load_fashion_mnist(cache_dir=cache)
    message = str(e.value)
    assert message.startswith("Fashion-MNIST not found. Searched:\n"
                              "  - $FMNIST_DATA_DIR (not set)\n"
                              f"  - {isolated}/no-debian (Debian package dataset-fashion-mnist): "
                              "no such directory\n"
                              f"  - {keras_dir(isolated)} (Keras cache): no such directory\n"
                              f"  - download into {cache}: not tried (data.download is false)\n")
    assert "as root: apt-get install dataset-fashion-mnist" in message
    assert "data.download: true (or --set data.download=true)" in message
    assert "--data-dir DIR" in message
    assert "tf.keras.datasets.fashion_mnist.load_data()' fills it" in message


def test_empty_env_dir_is_listed(isolated, monkeypatch):
    (isolated / "env").mkdir()
    monkeypatch.setenv("FMNIST_DATA_DIR", str(isolated / "env"))
    with pytest.raises(data.DataError) as e:
        data.load_fashion_mnist()
    assert f"  - {isolated}/env ($FMNIST_DATA_DIR): directory holds none of the files\n" in str(e.value)


# ---------------------------------------------------------------- the real dataset

def test_real_dataset(real):
    assert real.source == REAL_DIR
    for x, y, n in ((real.x_train, real.y_train, 60000), (real.x_test, real.y_test, 10000)):
        assert x.shape == (n, 28, 28) and x.dtype == np.uint8
        assert y.shape == (n,) and y.dtype == np.uint8
        assert np.bincount(y, minlength=10).tolist() == [n // 10] * 10
    assert real.x_train.max() == 255 and real.x_train.min() == 0


def test_real_dataset_is_found_by_default(real, monkeypatch):
    monkeypatch.delenv("FMNIST_DATA_DIR", raising=False)
    assert data.load_fashion_mnist().source == REAL_DIR


def test_uncompressed_copies(real, tmp_path):
    for name in GZ_NAMES:
        with gzip.open(os.path.join(REAL_DIR, name)) as src, open(tmp_path / name[:-3], "wb") as dst:
            shutil.copyfileobj(src, dst)
    raw = data.load_fashion_mnist(data_dir=str(tmp_path))
    assert raw.source == str(tmp_path)
    assert_same(raw, real)


# ---------------------------------------------------------------- downloading

class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that stopped reading: expected here
            super().handle_error(request, client_address)


@contextlib.contextmanager
def http_server(directory):
    handler = functools.partial(QuietHandler, directory=str(directory))
    server = QuietServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/files/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def serving_dir(tmp_path, names=GZ_NAMES):
    files = tmp_path / "www" / "files"
    files.mkdir(parents=True)
    for name in names:
        shutil.copyfile(os.path.join(REAL_DIR, name), files / name)
    return files


def test_download(real, isolated, capsys):
    files, cache = serving_dir(isolated), isolated / "cache"
    with http_server(files.parent) as url:
        got = data.load_fashion_mnist(download=True, cache_dir=str(cache), url=url)
    assert_same(got, real)
    assert got.source == f"{url} (downloaded to {cache})"
    assert sorted(os.listdir(cache)) == sorted(GZ_NAMES)  # no temporary files left
    err = capsys.readouterr().err
    size = os.path.getsize(files / "train-images-idx3-ubyte.gz")
    assert f"\rdownloading train-images-idx3-ubyte.gz: {size}/{size} bytes (100%)\n" in err
    assert "\rdownloading t10k-labels-idx1-ubyte.gz: 0/" in err

    # The server is gone: the next load is served from the cache, without a download.
    again = data.load_fashion_mnist(download=True, cache_dir=str(cache), url=url)
    assert again.source == str(cache)
    assert capsys.readouterr().err == ""


def test_download_truncated_file_then_resume(real, isolated, capsys):
    files, cache = serving_dir(isolated), isolated / "cache"
    labels = files / "train-labels-idx1-ubyte.gz"
    good = labels.read_bytes()
    labels.write_bytes(good[: len(good) // 2])
    with http_server(files.parent) as url:
        with pytest.raises(data.DataError) as e:
            data.load_fashion_mnist(download=True, cache_dir=str(cache), url=url, progress=False)
        message = str(e.value)
        assert message.startswith(f"download of {url}train-labels-idx1-ubyte.gz failed verification: ")
        assert "train-labels-idx1-ubyte.gz: gzip stream ends early after " in message
        assert "expected 60008 (the file is truncated)" in message
        assert f"download from {url} into {cache}: failed" in message
        assert "as root: apt-get install dataset-fashion-mnist" in message
        assert "data.download: true" not in message  # it already is
        # Nothing under the final name, no temporary directory; the file before it was kept.
        assert os.listdir(cache) == ["train-images-idx3-ubyte.gz"]

        labels.write_bytes(good)
        got = data.load_fashion_mnist(download=True, cache_dir=str(cache), url=url, progress=False)
    assert_same(got, real)
    assert capsys.readouterr().err == ""


def test_download_missing_on_server(isolated):
    require_real_data()
    files = serving_dir(isolated, GZ_NAMES[1:])
    with http_server(files.parent) as url:
        with pytest.raises(data.DataError, match=rf"^download of {url}train-images-idx3-ubyte\.gz failed: "
                                                 r"HTTP 404 File not found"):
            data.download_dataset(url, str(isolated / "cache"), progress=False)
    assert os.listdir(isolated / "cache") == []


def test_download_connection_refused(isolated):
    with http_server(isolated) as url:
        pass  # the port is closed again
    with pytest.raises(data.DataError, match=r"failed: \[Errno 111\] Connection refused"):
        data.download_dataset(url, str(isolated / "cache"), progress=False)


def test_download_refused_when_content_length_is_too_large(isolated):
    """The server announces more than any Fashion-MNIST file (a sparse file, no disk used)."""
    files = isolated / "www" / "files"
    files.mkdir(parents=True)
    (files / "train-images-idx3-ubyte.gz").write_bytes(b"")
    os.truncate(files / "train-images-idx3-ubyte.gz", data.DOWNLOAD_LIMIT + 1)
    with http_server(files.parent) as url:
        with pytest.raises(data.DataError) as e:
            data.download_dataset(url, str(isolated / "cache"), progress=False)
    assert str(e.value) == (f"download of {url}train-images-idx3-ubyte.gz failed: the server announces "
                            f"{data.DOWNLOAD_LIMIT + 1} bytes (Content-Length), more than any Fashion-MNIST file "
                            f"(limit {data.DOWNLOAD_LIMIT}); not downloaded")
    assert os.listdir(isolated / "cache") == []


class EndlessHandler(http.server.BaseHTTPRequestHandler):
    """Zeros without a Content-Length (the body ends when the connection does), up to 4x the limit."""
    sent = 0

    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        zeros = bytes(1 << 20)
        try:
            while EndlessHandler.sent < 4 * data.DOWNLOAD_LIMIT:
                self.wfile.write(zeros)
                EndlessHandler.sent += len(zeros)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


def test_download_stops_when_the_bytes_received_pass_the_limit(isolated):
    server = QuietServer(("127.0.0.1", 0), EndlessHandler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/files/"
    try:
        with pytest.raises(data.DataError) as e:
            data.download_dataset(url, str(isolated / "cache"), progress=False)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert str(e.value) == (f"download of {url}train-images-idx3-ubyte.gz failed: more than {data.DOWNLOAD_LIMIT} "
                            "bytes received, more than any Fashion-MNIST file; stopped")
    assert os.listdir(isolated / "cache") == []
    assert EndlessHandler.sent < 4 * data.DOWNLOAD_LIMIT, "the client stopped reading, the server did not run dry"


def test_download_limit_leaves_room_for_the_real_files():
    assert data.DOWNLOAD_LIMIT == 2 * 26421880
    if os.path.isdir(REAL_DIR):
        assert max(os.path.getsize(os.path.join(REAL_DIR, n)) for n in GZ_NAMES) < data.DOWNLOAD_LIMIT / 2


# ---------------------------------------------------------------- split and shards

@pytest.mark.parametrize("n, val_size", [(10, 0), (1000, 100), (60000, 5000)])
def test_split_train_val(n, val_size):
    train, val = data.split_train_val(n, val_size, seed=42)
    assert len(val) == val_size and len(train) == n - val_size
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(n))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)  # sorted, no repeats
    again = data.split_train_val(n, val_size, seed=42)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], val)
    if val_size:
        assert not np.array_equal(data.split_train_val(n, val_size, seed=43)[1], val)


@pytest.mark.parametrize("val_size", [-1, 1000])
def test_split_train_val_bad_size(val_size):
    with pytest.raises(data.DataError, match=rf"validation size {val_size} must be in \[0, 999\]"):
        data.split_train_val(1000, val_size, seed=0)


def test_steps_per_epoch():
    assert data.steps_per_epoch(55000, 2, 128) == 214
    assert data.steps_per_epoch(256, 2, 128) == 1
    with pytest.raises(data.DataError) as e:
        data.steps_per_epoch(255, 2, 128)
    assert str(e.value).startswith("255 training examples are fewer than one global batch "
                                   "(2 ranks x batch size 128 = 256)")


@pytest.mark.parametrize("n", [97, 1000, 4999])
@pytest.mark.parametrize("world_size", range(1, 9))
def test_epoch_shards(n, world_size):
    train_idx, _ = data.split_train_val(n + 10, 10, seed=7)
    for batch_size in (1, 5, 12):
        if n < world_size * batch_size:
            continue
        length = data.steps_per_epoch(n, world_size, batch_size) * batch_size
        dropped_by_epoch, order_by_epoch = [], []
        for epoch in (0, 1, 2, 3):
            shards = [data.epoch_shard(train_idx, epoch, 7, r, world_size, batch_size)
                      for r in range(world_size)]
            assert all(len(s) == length for s in shards)
            union = np.concatenate(shards)
            assert len(np.unique(union)) == len(union), "shards overlap"
            assert np.isin(union, train_idx).all()
            dropped = np.setdiff1d(train_idx, union)
            assert len(dropped) == n - world_size * length < world_size * batch_size
            assert np.array_equal(shards[-1], data.epoch_shard(train_idx, epoch, 7, world_size - 1,
                                                               world_size, batch_size))
            dropped_by_epoch.append(tuple(dropped))
            order_by_epoch.append(tuple(union))
        assert len(set(order_by_epoch)) == 4, "each epoch has its own permutation"
        if len(dropped_by_epoch[0]) >= 3:
            assert len(set(dropped_by_epoch)) > 1, "the dropped examples change between epochs"


def test_epoch_shard_depends_on_seed():
    train_idx = np.arange(1000)
    a = data.epoch_shard(train_idx, 1, 0, 0, 2, 10)
    assert np.array_equal(a, data.epoch_shard(train_idx, 1, 0, 0, 2, 10))
    assert not np.array_equal(a, data.epoch_shard(train_idx, 1, 1, 0, 2, 10))


def test_shuffles_do_not_repeat_the_split():
    """The split and the shuffles use separate random streams, even for epoch 0."""
    _, val = data.split_train_val(1000, 500, seed=3)
    shuffled = data.epoch_shard(np.arange(1000), 0, 3, 0, 1, 1000)
    assert not np.array_equal(np.sort(shuffled[:500]), val)


def test_epoch_shard_bad_rank():
    with pytest.raises(data.DataError, match=r"rank 2 is outside 0\.\.1"):
        data.epoch_shard(np.arange(100), 1, 0, 2, 2, 10)


def test_alternating_flips_show_every_image_both_ways_in_two_epochs_whatever_the_ranks():
    train_idx, _ = data.split_train_val(6000, 1000, seed=5)
    n = 6000
    for epoch in (1, 2, 3):
        # The mask is the example's, not the rank's: two ranks' shards together mirror exactly what
        # one rank mirrors over the same examples.
        one = dict(zip(data.epoch_shard(train_idx, epoch, 5, 0, 1, 500),
                       data.alternating_flips(data.epoch_shard(train_idx, epoch, 5, 0, 1, 500), n, 5, epoch)))
        for rank in (0, 1):
            shard = data.epoch_shard(train_idx, epoch, 5, rank, 2, 250)
            assert all(one[i] == m for i, m in zip(shard, data.alternating_flips(shard, n, 5, epoch)))
    idx = np.arange(n)
    first, second, third = (data.alternating_flips(idx, n, 5, e) for e in (1, 2, 3))
    assert np.array_equal(first, ~second) and np.array_equal(first, third)
    assert 0.45 < first.mean() < 0.55
    assert not np.array_equal(first, data.alternating_flips(idx, n, 6, 1)), "the coins follow the seed"


def test_evaluation_shifts_move_the_image_and_fill_with_zeros():
    from fmnist_dist.training.pipeline import shifted     # imports TensorFlow: here, not at the top
    image = np.arange(1, 10, dtype=np.uint8).reshape(1, 3, 3)
    assert shifted(image, 1, 0)[0].tolist() == [[0, 0, 0], [1, 2, 3], [4, 5, 6]]
    assert shifted(image, 0, -1)[0].tolist() == [[2, 3, 0], [5, 6, 0], [8, 9, 0]]
    assert shifted(image, 0, 0).tolist() == image.tolist()
