import gzip
import pickle
import struct

import numpy as np
import pytest

from esm_core.pools import image_data as D


def _write_idx(path, arr: np.ndarray, code=0x08, compress=True):
    head = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", s) for s in arr.shape)
    body = head + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(body) if compress else body)


def test_read_idx_roundtrip_gz_and_plain(tmp_path):
    x = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", x)
    _write_idx(tmp_path / "b", x, compress=False)
    assert np.array_equal(D.read_idx(tmp_path / "a.gz"), x)
    assert np.array_equal(D.read_idx(tmp_path / "b"), x)
    y = np.array([1, -7, 300000], dtype=np.int32)
    _write_idx(tmp_path / "c.gz", y, code=0x0C)
    assert D.read_idx(tmp_path / "c.gz").tolist() == [1, -7, 300000]


def test_read_idx_refuses_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ValueError, match="magic"):
        D.read_idx(tmp_path / "bad")
    x = np.zeros((2, 2), np.uint8)
    _write_idx(tmp_path / "short", x, compress=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(ValueError, match="needs 4"):
        D.read_idx(tmp_path / "short")


def test_load_fashion_mnist_layout(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 5), ("t10k", 3)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)).astype(np.uint8))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n, dtype=np.uint8))
    d = D.load_fashion_mnist(tmp_path)
    assert d["train"][0].shape == (5, 28, 28) and d["test"][1].tolist() == [0, 1, 2]
    assert d["train"][1].dtype == np.int64


def test_array_only_unpickler(tmp_path):
    arr = np.arange(6, dtype=np.uint8).reshape(2, 3)
    (tmp_path / "ok.gz").write_bytes(gzip.compress(pickle.dumps(arr)))
    assert np.array_equal(D.load_array_pickle(tmp_path / "ok.gz"), arr)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    (tmp_path / "evil.gz").write_bytes(gzip.compress(pickle.dumps(Evil())))
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        D.load_array_pickle(tmp_path / "evil.gz")
    (tmp_path / "list.gz").write_bytes(gzip.compress(pickle.dumps([1, 2])))
    with pytest.raises(ValueError, match="numpy array"):
        D.load_array_pickle(tmp_path / "list.gz")


def test_animal_mnist_reader_on_fixture(tmp_path):
    x = np.full((4, 28, 28), 7, np.uint8)
    y = np.array([0, 1, 2, 9], dtype=np.int64)
    (tmp_path / "animal_data_version_3.gz").write_bytes(gzip.compress(pickle.dumps(x)))
    (tmp_path / "animal_label_version_3.gz").write_bytes(gzip.compress(pickle.dumps(y)))
    gx, gy = D.load_animal_mnist(tmp_path)
    assert gx.shape == (4, 28, 28) and gy.tolist() == [0, 1, 2, 9]


def test_opencv_digits_grid(tmp_path):
    from PIL import Image
    cell = 4
    img = np.zeros((10 * cell, 3 * cell), np.uint8)   # 10 rows (one per digit), 3 columns
    for r in range(10):
        img[r * cell:(r + 1) * cell] = r * 20
    img[0:cell, cell:2 * cell] = 255                    # row 0, column 1
    Image.fromarray(img).save(tmp_path / "digits.png")
    x, y = D.load_opencv_digits(tmp_path / "digits.png", cell=cell)
    assert x.shape == (30, cell, cell)
    assert y.tolist() == [d for d in range(10) for _ in range(3)]
    assert (x[1] == 255).all() and (x[0] == 0).all() and (x[29] == 180).all()
    Image.fromarray(np.zeros((10, 7), np.uint8)).save(tmp_path / "odd.png")
    with pytest.raises(ValueError, match="grid"):
        D.load_opencv_digits(tmp_path / "odd.png", cell=cell)


def test_fit_to_canvas_keeps_aspect_and_centres():
    img = np.full((10, 5), 200, np.uint8)
    out = D.fit_to_canvas(img, box=20, size=28)
    ys, xs = np.nonzero(out)
    assert out.shape == (28, 28)
    assert ys.max() - ys.min() + 1 == 20 and xs.max() - xs.min() + 1 == 10
    assert ys.min() == 4 and xs.min() == 9


def test_rasterise_svg_inverts_and_fits(tmp_path):
    pytest.importorskip("cairosvg")
    svg = ('<svg xmlns="http://www.w3.org/2000/svg" width="100" height="50">'
           '<rect x="0" y="0" width="100" height="50" fill="black"/></svg>')
    (tmp_path / "r.svg").write_text(svg)
    out = D.rasterise_svg(tmp_path / "r.svg", box=24, size=28)
    ys, xs = np.nonzero(out > 128)
    assert xs.max() - xs.min() + 1 == 24 and ys.max() - ys.min() + 1 == 12   # 2:1 kept
    assert out[0, 0] == 0                                                        # background black


def test_clipart_groups_and_splits():
    paths = ["animals/birds/a.svg", "animals/birds/penguin/b.svg", "tools/weapons/c.svg", "tools/d.svg", "x/e.svg"]
    g = D.clipart_groups(paths, {"bird": ["animals/birds"], "weapon": ["tools/weapons"], "tool": ["tools"]})
    assert g["bird"].tolist() == [0, 1] and g["weapon"].tolist() == [2] and g["tool"].tolist() == [3]
    keep, held = D.split_indices(100, 0.1, max_n=5, seed=0)
    assert len(held) == 5 and len(keep) == 95 and not set(keep) & set(held)
    assert np.array_equal(held, D.split_indices(100, 0.1, max_n=5, seed=0)[1])
    y = np.array([0] * 10 + [1] * 20)
    k, h = D.stratified_split(y, 0.2, seed=1)
    assert (y[h] == 0).sum() == 2 and (y[h] == 1).sum() == 4 and len(k) + len(h) == 30
    with pytest.raises(ValueError):
        D.split_indices(10, 1.5)
