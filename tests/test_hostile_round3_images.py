"""Hostile uploads, round 3 (image side): decoded pixels bounded before decoding, the tower's input size bounded,
one file given for several tasks read once, safetensors headers and torch archives bounded before parsing,
unsupported dtypes refused by name, a lazily read file rewritten on disk refused clearly."""
from __future__ import annotations

import io
import os
import resource
import time
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import esm_core
from esm_core import checkpoints as C
from esm_core.checkpoints import CheckpointError, load_checkpoint, save_safetensors
from esm_core.lazy import LazyCheckpoint
from esm_core.models.openclip_vit import build_visual_tower
from esm_core.pools import upload as U


def _rss_mib() -> float:
    """Resident memory now (VmRSS), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _tower(folder, image_size: int, patch: int = 32, tasks=("a", "b")):
    """A tiny open_clip tower (width 16, one block) reading ``image_size`` px images: (base path, {task: path})."""
    cfg = {"embed_dim": 8, "quick_gelu": True,
           "vision_cfg": {"image_size": image_size, "layers": 1, "width": 16, "patch_size": patch, "head_width": 8}}
    torch.manual_seed(0)
    base = {f"visual.{k}": t.detach().clone() for k, t in build_visual_tower(cfg).state_dict().items()}
    base_path = save_safetensors(base, folder / "base.safetensors")
    paths = {t: save_safetensors({k: v + 0.01 * (i + 1) for k, v in base.items()}, folder / f"{t}.safetensors")
             for i, t in enumerate(tasks)}
    return base_path, paths


def _png_zip(path, n: int, size: int = 1):
    """``n`` copies of one ``size``×``size`` PNG in two class folders (the attack: a few bytes per image)."""
    rng = np.random.default_rng(n)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for i in range(n):
            b = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(b, "PNG")
            z.writestr(f"c{i % 2}/{i}.png", b.getvalue())
    return path


@pytest.fixture()
def no_decoding(monkeypatch):
    """Fails the test if any image is decoded."""
    def boom(*a, **k):
        raise AssertionError("an image was decoded before the upload was refused")
    monkeypatch.setattr(U.Image, "open", boom)


@pytest.fixture()
def counted_loads(monkeypatch):
    """The checkpoint files pool_from_upload reads, in order."""
    seen = []
    real = U.load_checkpoint

    def load(path, **kw):
        seen.append(os.path.basename(str(path)))
        return real(path, **kw)
    monkeypatch.setattr(U, "load_checkpoint", load)
    return seen


# ----------------------------------------------------------------------------- finding 7: decoded pixels
def test_a_tower_reading_huge_images_is_refused_before_any_task_or_image_is_read(tmp_path, no_decoding,
                                                                                  counted_loads):
    base, tasks = _tower(tmp_path, 1024)                    # 93 KB of zips made 10 GB with this tower
    zips = {t: _png_zip(tmp_path / f"{t}.zip", 20) for t in tasks}
    with pytest.raises(ValueError, match=r"reads 1024 px images; .* at most at 512×512 px"):
        U.pool_from_upload(base, tasks, zips, arch="infer", head_width=8, normalisation="clip",
                           keep_dir=tmp_path / "keep")
    assert counted_loads == ["base.safetensors"]            # the tasks were never read
    assert not list((tmp_path / "keep").glob("*")) if (tmp_path / "keep").exists() else True
    cfg = {"embed_dim": 8, "quick_gelu": True,              # an uploaded config may declare it too
           "vision_cfg": {"image_size": 1024, "layers": 1, "width": 16, "patch_size": 32, "head_width": 8},
           "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    with pytest.raises(ValueError, match="1024 px"):
        U.pool_from_upload(base, tasks, zips, config=cfg)


def test_the_number_of_patches_is_bounded_too(tmp_path, no_decoding):
    base, tasks = _tower(tmp_path, 512, patch=8)             # 64×64 = 4,096 tokens
    zips = {t: _png_zip(tmp_path / f"{t}.zip", 4) for t in tasks}
    with pytest.raises(ValueError, match=r"64×64 patches of 8 px; at most 32×32"):
        U.pool_from_upload(base, tasks, zips, arch="infer", head_width=8, normalisation="clip")


def test_many_copies_of_a_tiny_png_refused_before_decoding_with_the_figures(tmp_path, monkeypatch, no_decoding,
                                                                            counted_loads):
    monkeypatch.delenv("ESM_SESSION_MEMORY_MB", raising=False)        # the default 8 GiB budget
    base, tasks = _tower(tmp_path, 512)                                # the largest input size allowed
    zips = {t: _png_zip(tmp_path / f"{t}.zip", 2000) for t in tasks}
    assert sum(os.path.getsize(z) for z in zips.values()) < 1024 ** 2   # < 1 MB of zips ...
    before, t0 = _rss_mib(), time.perf_counter()
    with pytest.raises(ValueError) as e:                               # ... would decode to 15 GB
        U.pool_from_upload(base, tasks, zips, arch="infer", head_width=8, normalisation="clip",
                           keep_dir=tmp_path / "keep")
    seconds, grown = time.perf_counter() - t0, _rss_mib() - before
    msg = str(e.value)
    for part in ("images of task 'a': 2000 images at 512×512 px", "7,500.0 MiB", "a: 2000, b: 2000",
                 "15,000.0 MiB of images", "8,192.0 MiB a session may hold", "ESM_SESSION_MEMORY_MB"):
        assert part in msg, (part, msg)
    assert counted_loads == ["base.safetensors"]
    assert not (tmp_path / "keep").exists() or not list((tmp_path / "keep").iterdir())
    assert grown < 64, f"resident memory grew by {grown:.0f} MiB in {seconds:.1f} s"


def test_the_budget_is_the_sessions_or_the_callers_and_images_decode_into_place(tmp_path, monkeypatch):
    base, tasks = _tower(tmp_path, 32, patch=8)
    zips = {t: _png_zip(tmp_path / f"{t}.zip", 40, size=5) for t in tasks}   # 80 × 32² × 3 × 5 B = 1.2 MB
    assert U.decoded_image_bytes(80, 32) == 80 * 32 * 32 * 3 * 5
    kw = dict(arch="infer", head_width=8, normalisation="clip")
    with pytest.raises(ValueError, match=r"1.2 MiB of images.* 1.8 MiB for the heads' feature pass\) needs about "
                                         r"3.1 MiB, more than the 0.5 MiB allowed \(memory_budget\)"):
        U.pool_from_upload(base, tasks, zips, memory_budget=2 ** 19, **kw)
    monkeypatch.setenv("ESM_SESSION_MEMORY_MB", "1")
    with pytest.raises(ValueError, match=r"more than the 1.0 MiB a session may hold"):
        U.pool_from_upload(base, tasks, zips, **kw)
    monkeypatch.setenv("ESM_SESSION_MEMORY_MB", "64")
    pool, notes = U.pool_from_upload(base, tasks, zips, **kw)
    x, y, classes = U.read_image_zip(zips["a"], 32, "a")
    val, test = U._split_val_test(y)
    got_x, got_y = pool.data["a"]["val"]
    assert got_x.dtype == np.uint8 and got_x.shape == (20, 32, 32, 3) and got_x.flags.owndata
    np.testing.assert_array_equal(got_x, x[val])
    np.testing.assert_array_equal(got_y, y[val])
    np.testing.assert_array_equal(pool.data["a"]["test"][0], x[test])
    assert pool.heads["a"].shape == (2, 8) and torch.isfinite(pool.heads["a"]).all()


def test_read_image_zip_is_bounded_before_decoding(tmp_path, no_decoding):
    z = _png_zip(tmp_path / "t.zip", 100)
    with pytest.raises(ValueError, match=r"100 images at 64×64 px need 5.9 MiB once decoded .* more than the 1.0 MiB"):
        U.read_image_zip(z, 64, "t", max_bytes=1024 ** 2)
    with pytest.raises(ValueError, match="at most at 512×512"):
        U.read_image_zip(z, 1024, "t")


def test_head_features_are_computed_in_bounded_batches(monkeypatch):
    vit_b = {"vision_cfg": {"image_size": 224, "patch_size": 32, "width": 768, "head_width": 64}}
    vit_l = {"vision_cfg": {"image_size": 336, "patch_size": 14, "width": 1024, "head_width": 64}}
    big = {"vision_cfg": {"image_size": 512, "patch_size": 16, "width": 1024, "head_width": 64}}
    assert U._head_batch(vit_b) == 128
    assert U._head_batch(vit_l) == 12 and U._head_batch(big) == 4
    sizes = []

    def normalise(raw):
        sizes.append(len(raw))
        return torch.zeros(len(raw), 3)
    head = U._centroid_head(lambda x: x, normalise, np.zeros((25, 2, 2, 3), np.uint8), np.arange(25) % 2, 2, 7)
    assert sizes == [7, 7, 7, 4] and head.shape == (2, 3)


# ----------------------------------------------------------------------------- finding 11: one file, N tasks
@pytest.mark.parametrize("keep", [True, False])
def test_one_file_given_for_two_tasks_is_read_and_written_once(tmp_path, counted_loads, keep):
    base, tasks = _tower(tmp_path, 32, patch=8, tasks=("a",))
    zips = {t: _png_zip(tmp_path / f"{t}.zip", 8, size=3) for t in ("a", "b")}
    keep_dir = tmp_path / "keep" if keep else None
    pool, _ = U.pool_from_upload(base, {"a": tasks["a"], "b": tasks["a"]}, zips, arch="infer", head_width=8,
                                 normalisation="clip", keep_dir=keep_dir)
    assert counted_loads == ["base.safetensors", "a.safetensors"]
    k = "visual.conv1.weight"
    torch.testing.assert_close(pool.tasks["b"][k], pool.tasks["a"][k], rtol=0, atol=0)
    if keep:
        assert sorted(p.name for p in keep_dir.iterdir()) == ["task-0.safetensors"]
        assert pool.tasks["b"].path == pool.tasks["a"].path
    else:
        assert pool.tasks["b"] is not pool.tasks["a"]                        # own dicts ...
        assert pool.tasks["b"][k].data_ptr() == pool.tasks["a"][k].data_ptr()   # ... over the same tensors


# ----------------------------------------------------------------------------- finding 12: headers, dtypes
def _write_header(path, n: int) -> None:
    """A safetensors file of ``n`` empty tensors (the header only), streamed: never held as Python objects."""
    def entries():
        for i in range(n):
            yield (b"," if i else b"{") + b'"t%d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}' % i
        yield b"}"
    size = sum(len(e) for e in entries())
    pad = -size % 8
    with open(path, "wb") as f:
        f.write((size + pad).to_bytes(8, "little"))
        for e in entries():
            f.write(e)
        f.write(b" " * pad)


def test_a_million_empty_tensors_are_refused_from_the_header_alone(tmp_path):
    p = tmp_path / "many.safetensors"
    _write_header(p, 1_000_000)                               # 56 MiB of header
    before, t0 = _rss_mib(), time.perf_counter()
    with pytest.raises(CheckpointError, match=r"many.safetensors: safetensors header of 56.\d MiB, more than the 8 MiB "
                                              r"a checkpoint of at most 20,000 tensors needs"):
        load_checkpoint(p)
    seconds, grown = time.perf_counter() - t0, _rss_mib() - before
    assert grown < 32, f"resident memory grew by {grown:.0f} MiB in {seconds:.1f} s"
    with pytest.raises(CheckpointError, match="header of 56"):
        LazyCheckpoint(p)


def test_more_tensors_than_any_model_has_are_refused_before_parsing(tmp_path):
    p = tmp_path / "30k.safetensors"
    _write_header(p, 30_000)                                  # 1.6 MiB: under the header bound, over the count
    with pytest.raises(CheckpointError, match=r"holds 30,000 tensors, more than the 20,000"):
        load_checkpoint(p)


def test_a_torch_archive_is_bounded_before_it_is_unpickled(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "MAX_CHECKPOINT_TENSORS", 10)
    monkeypatch.setattr(C, "_torch_load_stubbed", lambda *a: pytest.fail("unpickled before the bound"))
    p = tmp_path / "many.pt"
    torch.save({f"t{i}": torch.zeros(2) for i in range(40)}, p)     # 40 storages: 40 archive members
    with pytest.raises(CheckpointError, match=r"archive of \d\d members, more than .* at most 10 tensors"):
        load_checkpoint(p)
    monkeypatch.undo()
    monkeypatch.setattr(C, "MAX_CHECKPOINT_TENSORS", 10)
    one = torch.zeros(40)
    torch.save({f"t{i}": one[i:i + 1] for i in range(40)}, p)       # 40 views of one storage
    with pytest.raises(CheckpointError, match=r"holds 40 tensors, more than the 10"):
        load_checkpoint(p)


def test_a_zip64_archive_count_is_read_from_its_end_record(tmp_path):
    p = tmp_path / "z.zip"
    with zipfile.ZipFile(p, "w", allowZip64=True) as z:
        for i in range(70_000):                                 # > 65,535 members: a zip64 end record
            z.writestr(f"d/{i}", b"")
    assert C._zip_entry_count(p) == 70_000


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64])
def test_unsupported_dtypes_are_refused_naming_the_key_and_dtype(tmp_path, dtype):
    w = torch.zeros(2, 2).to(dtype)
    pt = tmp_path / "t.pt"
    torch.save({"visual.proj": w, "visual.ok": torch.zeros(2)}, pt)
    with pytest.raises(CheckpointError, match=rf"t.pt: unsupported tensor dtype for 'visual.proj' \({dtype}\)"):
        load_checkpoint(pt)
    if dtype.is_floating_point:
        st = tmp_path / "t.safetensors"
        save_file({"visual.proj": w, "visual.ok": torch.zeros(2)}, str(st))
        with pytest.raises(CheckpointError, match=r"unsupported tensor dtype for 'visual.proj' \(F8_E(4M3|5M2)\)"):
            load_checkpoint(st)
        with pytest.raises(CheckpointError, match=r"'visual.proj' \(F8_"):
            LazyCheckpoint(st)


def test_a_float8_task_upload_is_refused_clearly(tmp_path):
    base, tasks = _tower(tmp_path, 32, patch=8)
    sd = load_checkpoint(tasks["b"])
    sd["visual.proj"] = sd["visual.proj"].to(torch.float8_e4m3fn)
    save_file(sd, str(tasks["b"]))
    zips = {t: _png_zip(tmp_path / f"{t}.zip", 4) for t in tasks}
    with pytest.raises(CheckpointError, match=r"b.safetensors: unsupported tensor dtype for 'visual.proj' \(F8_E4M3\)"):
        U.pool_from_upload(base, tasks, zips, arch="infer", head_width=8, normalisation="clip")


def test_an_integer_weight_where_the_base_has_floats_is_refused(tmp_path):
    base = {"w": torch.zeros(3, 3), "b": torch.zeros(3)}
    p = tmp_path / "t.safetensors"
    save_file({"w": torch.zeros(3, 3, dtype=torch.int32), "b": torch.zeros(3)}, str(p))
    with pytest.raises(CheckpointError, match=r"dtype mismatch \(float vs non-float\): w: torch.int32 vs base "
                                              r"torch.float32"):
        load_checkpoint(p, base=base)


# ----------------------------------------------------------------------------- finding 12: files changed on disk
def test_a_lazy_file_rewritten_with_another_shape_is_refused_clearly(tmp_path):
    p = tmp_path / "t.safetensors"
    save_file({"w": torch.ones(2, 3), "b": torch.ones(3)}, str(p))
    ck = LazyCheckpoint(p, name="task 'cars'")
    assert ck["w"].shape == (2, 3)
    save_file({"w": torch.ones(4, 3), "b": torch.ones(3)}, str(p))            # another size
    with pytest.raises(CheckpointError, match=r"task 'cars': the file changed on disk since it was loaded .*reload"):
        ck["w"]
    with pytest.raises(CheckpointError, match="changed on disk"):
        ck.load()


def test_a_same_size_rewrite_with_the_old_mtime_is_caught_by_the_shape(tmp_path):
    p = tmp_path / "t.safetensors"
    save_file({"w": torch.ones(2, 3)}, str(p))
    st = os.stat(p)
    ck = LazyCheckpoint(p, name="task 'x'")
    save_file({"w": torch.ones(3, 2)}, str(p))                              # same bytes, transposed
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(p).st_size == st.st_size
    with pytest.raises(CheckpointError, match=r"task 'x': the file changed on disk .*'w' is now \(3, 2\)"):
        ck["w"]


def test_a_task_rewritten_mid_merge_stops_the_merge_with_a_clear_error(tmp_path):
    base, tasks = _tower(tmp_path, 32, patch=8)
    lazy = {t: LazyCheckpoint(p, name=f"task {t!r}") for t, p in tasks.items()}
    (tmp_path / "x").mkdir()
    other, _ = _tower(tmp_path / "x", 64, patch=8, tasks=())    # the same keys, other shapes
    calls = []

    def progress(frac, desc):
        if not calls:                                        # after the merge has started: swap task b's file
            os.replace(other, tasks["b"])
        calls.append(frac)
    with pytest.raises(CheckpointError, match=r"task 'b': the file changed on disk since it was loaded"):
        esm_core.merge("task_arithmetic", load_checkpoint(base), lazy, alpha=0.3, progress=progress)
