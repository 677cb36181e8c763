"""Readers for the real image data sets behind the demo pool (used at build time only).

Every reader returns plain ``uint8`` numpy arrays of grey images, white (255)
on black (0), like MNIST, plus ``int64`` labels. Sources (all installable
offline from Debian or PyPI): Fashion-MNIST (Debian ``dataset-fashion-mnist``),
Animal-MNIST silhouettes (PyPI ``animal-mnist``), OpenCV's ``digits.png``
(Debian ``opencv-doc``), scikit-learn's ``load_digits``, and the public-domain
clip art of Debian ``openclipart-svg`` (rasterised with cairosvg).
"""
from __future__ import annotations

import gzip
import importlib.util
import io
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
OPENCLIPART_DIR = "/usr/share/openclipart/svg"
OPENCV_DIGITS = "/usr/share/doc/opencv-doc/examples/data/digits.png"

FASHION_CLASSES = ["T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot"]
# Class order of the Animal-MNIST labels 0..9 (package description, alphabetical).
ANIMAL_CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
DIGIT_CLASSES = [str(i) for i in range(10)]


# ---------------------------------------------------------------- IDX (MNIST format)
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed or not, into a numpy array."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_TYPES:
        raise ValueError(f"{path}: unknown IDX data type code 0x{code:02x}")
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: IDX header truncated")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_TYPES[code])
    need = int(np.prod(shape)) * dtype.itemsize
    body = raw[4 + 4 * ndim:]
    if len(body) != need:
        raise ValueError(f"{path}: IDX body has {len(body)} bytes, header {shape} needs {need}")
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def load_fashion_mnist(root: str | Path = FASHION_DIR) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (x 60000×28×28, y), "test": (x 10000×28×28, y)}`` from the IDX files in ``root``."""
    root = Path(root)
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
        y = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
        if x.ndim != 3 or len(x) != len(y):
            raise ValueError(f"{root}: {prefix} images {x.shape} and labels {y.shape} do not match")
        out[split] = (x.astype(np.uint8), y)
    return out


# ---------------------------------------------------------------- Animal-MNIST (gzip pickles of arrays)
class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain numpy arrays and nothing else: any other global is refused."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain numpy arrays are allowed")
        return super().find_class(module, name)


def load_array_pickle(path: str | Path) -> np.ndarray:
    """Load one numpy array from a (gzip-compressed) pickle, allowing no globals but numpy's array ones."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    arr = _ArrayOnlyUnpickler(io.BytesIO(raw)).load()
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"{path}: expected a numpy array, got {type(arr).__name__}")
    return arr


def animal_mnist_dir() -> Path:
    """Folder of the data files of the installed ``animal-mnist`` package (found without importing it)."""
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package 'animal-mnist' is not installed (pip install --no-deps animal-mnist; its data files are read directly)")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "Animal_MNIST"


def load_animal_mnist(data_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Animal silhouettes: (x 10000×28×28 uint8, y int64 in 0..9, see ANIMAL_CLASSES)."""
    d = Path(data_dir) if data_dir is not None else animal_mnist_dir()
    x = load_array_pickle(d / "animal_data_version_3.gz")
    y = load_array_pickle(d / "animal_label_version_3.gz").astype(np.int64).reshape(-1)
    if x.ndim != 3 or len(x) != len(y):
        raise ValueError(f"{d}: images {x.shape} and labels {y.shape} do not match")
    return x.astype(np.uint8), y


# ---------------------------------------------------------------- OpenCV digits.png and sklearn digits
def read_grey_png(path: str | Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L"), dtype=np.uint8)


def load_opencv_digits(path: str | Path = OPENCV_DIGITS, cell: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's ``digits.png`` (5000 hand-written digits, 20×20 cells, 500 per digit in row blocks)."""
    img = read_grey_png(path)
    h, w = img.shape
    if h % cell or w % cell:
        raise ValueError(f"{path}: image {w}×{h} is not a grid of {cell}-pixel cells")
    rows, cols = h // cell, w // cell
    x = img.reshape(rows, cell, cols, cell).transpose(0, 2, 1, 3).reshape(rows * cols, cell, cell)
    if rows % 10:
        raise ValueError(f"{path}: {rows} rows of cells cannot hold 10 digit classes")
    y = np.repeat(np.arange(10, dtype=np.int64), rows * cols // 10)
    return x, y


def load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8×8 digits (1797), scaled from 0..16 to 0..255."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return x, d.target.astype(np.int64)


# ---------------------------------------------------------------- geometry
def fit_to_canvas(img: np.ndarray, box: int = 20, size: int = 28) -> np.ndarray:
    """Resize a grey image so that its longer side is ``box`` pixels (aspect kept) and centre it on a
    black ``size``×``size`` canvas (MNIST's layout: 20-pixel box in 28 pixels)."""
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D grey image, got shape {img.shape}")
    h, w = img.shape
    s = box / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    im = Image.fromarray(img).resize((nw, nh), Image.BILINEAR)
    out = np.zeros((size, size), np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top:top + nh, left:left + nw] = np.asarray(im)
    return out


def fit_all(x: np.ndarray, box: int = 20, size: int = 28) -> np.ndarray:
    return np.stack([fit_to_canvas(im, box, size) for im in x]) if len(x) else np.zeros((0, size, size), np.uint8)


# ---------------------------------------------------------------- clip art
def list_svgs(root: str | Path = OPENCLIPART_DIR) -> list[str]:
    """Paths of all SVG files under ``root`` relative to it, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"clip-art folder {root} not found (Debian package openclipart-svg)")
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.svg"))


def rasterise_svg(path: str | Path, box: int = 24, size: int = 28, render: int = 64) -> np.ndarray:
    """Render one SVG on white, to grey, inverted (ink white on black), fitted into ``box`` of ``size``.

    Raises on files cairosvg refuses (e.g. XML entities, which stay forbidden)."""
    import cairosvg
    png = cairosvg.svg2png(url=str(path), output_width=render, background_color="white")
    with Image.open(io.BytesIO(png)) as im:
        g = 255 - np.asarray(im.convert("L"), dtype=np.uint8)
    ys, xs = np.nonzero(g > 8)
    if len(ys) == 0:
        raise ValueError(f"{path}: renders blank")
    g = g[ys.min():ys.max() + 1, xs.min():xs.max() + 1]      # crop to the ink
    return fit_to_canvas(g, box, size)


def rasterise_clipart(root: str | Path = OPENCLIPART_DIR, files: list[str] | None = None,
                      cache: str | Path | None = None, progress=None) -> tuple[np.ndarray, list[str]]:
    """Rasterise every SVG (relative paths ``files``, default all under ``root``) to 28×28.

    Returns ``(images N×28×28 uint8, paths)`` for the files that rendered (failures are skipped).
    With ``cache`` (an .npz path), the result is stored there and read back next time.
    """
    if cache is not None and Path(cache).exists():
        z = np.load(cache, allow_pickle=False)
        return z["images"], [str(p) for p in z["paths"]]
    files = list_svgs(root) if files is None else files
    imgs, ok = [], []
    for i, rel in enumerate(files):
        try:
            imgs.append(rasterise_svg(Path(root) / rel))
            ok.append(rel)
        except Exception:  # noqa: BLE001  (unrenderable or entity-using files are skipped)
            pass
        if progress is not None and i % 200 == 0:
            progress(i / max(len(files), 1), f"rasterising clip art {i}/{len(files)}")
    images = np.stack(imgs) if imgs else np.zeros((0, 28, 28), np.uint8)
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(cache, images=images, paths=np.array(ok))
    return images, ok


def clipart_groups(paths: list[str], groups: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """Indices of ``paths`` falling under each group's folder prefixes (first matching group wins)."""
    out: dict[str, list[int]] = {g: [] for g in groups}
    for i, p in enumerate(paths):
        for g, prefixes in groups.items():
            if any(p.startswith(pre.rstrip("/") + "/") for pre in prefixes):
                out[g].append(i)
                break
    return {g: np.array(v, dtype=np.int64) for g, v in out.items()}


# ---------------------------------------------------------------- splits
def split_indices(n: int, frac: float, max_n: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``frac`` of ``range(n)`` (at most ``max_n``), drawn with ``seed``: (kept, held_out), sorted."""
    if not 0 < frac < 1:
        raise ValueError(f"frac must be in (0, 1), got {frac}")
    k = int(round(n * frac))
    if max_n is not None:
        k = min(k, max_n)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[k:]), np.sort(perm[:k])


def stratified_split(y: np.ndarray, frac: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``frac`` of each class (seeded): (kept, held_out) index arrays, sorted."""
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.nonzero(y == c)[0])
        k = int(round(len(idx) * frac))
        held.append(idx[:k])
        keep.append(idx[k:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))
