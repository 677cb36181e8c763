"""Hostile inputs at the library level (issue 12, items 6-8 and 13).

Each test here failed before its fix: non-finite numbers that passed, integers
that were rounded or unbounded, a name check fooled by a trailing newline, a
pickle deep enough to blow Python's recursion limit, method names the
ecosystem uses that were unknown, and swapped checkpoints that gave > 100 %
normalised accuracy without a word.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from esm_core import cli
from esm_core.merging import METHODS, Method, Param, alpha_param, get_method, register
from esm_core.schemas import MethodSpec
from esm_core.merging import registry


# --------------------------------------------------------------------------- (7) parameters


@pytest.mark.parametrize("value", [float("nan"), "nan", "NaN", float("inf"), "-inf", np.float64("nan")])
@pytest.mark.parametrize("method", ["ta", "ties", "dare_ta", "esm", "iso_cts"])
def test_non_finite_alpha_refused_naming_the_parameter(method, value):
    with pytest.raises(ValueError, match=r"parameter 'alpha' must be a finite number"):
        get_method(method).resolve({"alpha": value})


def test_non_finite_refused_even_without_bounds():
    p = Param("shift", float, 0.0, "no bounds at all")
    for v in (float("nan"), float("inf"), float("-inf"), "inf"):
        with pytest.raises(ValueError, match="'shift' must be a finite number"):
            p.check(v)
    assert p.check("1e300") == 1e300                       # large but finite is a number


@pytest.mark.parametrize("param", ["k", "p"])
def test_every_float_parameter_of_dare_ties_refuses_nan(param):
    with pytest.raises(ValueError, match=f"'{param}' must be a finite number"):
        get_method("dare_ties").resolve({param: float("nan")})


@pytest.mark.parametrize("value", [1.5, "1.5", np.float32(1.5), np.float64(2.5), True, False, float("nan"),
                                   float("inf"), "1e3", "seven"])
def test_dare_seed_must_be_an_exact_integer(value):
    with pytest.raises(ValueError, match="parameter 'seed' must be of type int"):
        get_method("dare_ta").resolve({"seed": value})


@pytest.mark.parametrize("value,expected", [(7, 7), ("7", 7), (" 7 ", 7), (7.0, 7), (np.int64(7), 7),
                                            (np.float32(7.0), 7), (2 ** 63 - 1, 2 ** 63 - 1)])
def test_dare_seed_accepts_integers(value, expected):
    got = get_method("dare_ta").resolve({"seed": value})["seed"]
    assert got == expected and type(got) is int


@pytest.mark.parametrize("value", [2 ** 63, 2 ** 70, str(2 ** 70)])
def test_dare_seed_bounded(value):
    with pytest.raises(ValueError, match="parameter 'seed' must (be <=|fit in 64 bits)"):
        get_method("dare_ta").resolve({"seed": value})


def test_any_int_parameter_must_fit_in_64_bits():
    p = Param("n", int, 0, "no declared max")
    assert p.check(2 ** 63 - 1) == 2 ** 63 - 1
    with pytest.raises(ValueError, match="'n' must fit in 64 bits"):
        p.check(2 ** 70)


def test_bool_parameters_refuse_numbers_that_are_not_truth_values():
    p = Param("flag", bool, False, "a flag")
    assert p.check(1) is True and p.check(0) is False and p.check("off") is False
    for v in (float("nan"), 2, 0.5):
        with pytest.raises(ValueError, match="'flag' must be of type bool"):
            p.check(v)


def test_every_int_parameter_of_every_method_has_a_max():
    import esm_core.merging  # noqa: F401  (registers the methods)
    unbounded = [(m.name, p.name) for m in METHODS.values() for p in m.params if p.type is int and p.max is None]
    assert not unbounded


# --------------------------------------------------------------------------- (13) aliases


@pytest.mark.parametrize("alias,name", [("task_arithmetic", "ta"), ("dare_linear", "dare_ta"),
                                        ("dare_ties", "dare_ties"), ("ties_merging", "ties"),
                                        ("simple_average", "average"), ("tsvm", "tsv_m"),
                                        ("task_singular_vector", "tsv_m"), ("dare/task_arithmetic", "dare_ta"),
                                        ("dare/ties_merging", "dare_ties")])
def test_ecosystem_names_resolve(alias, name):
    assert get_method(alias) is METHODS[name]


def test_aliases_are_not_methods_of_their_own():
    assert "task_arithmetic" not in METHODS and "dare_linear" not in METHODS
    assert set(registry.ALIASES.values()) <= set(METHODS)


def test_merge_accepts_an_alias():
    from esm_core.merging import merge_updates
    base = {"w": torch.zeros(3, 2)}
    tasks = {"a": {"w": torch.ones(3, 2)}, "b": {"w": 2 * torch.ones(3, 2)}}
    roles = {"w": "matrix"}
    by_alias = merge_updates("task_arithmetic", base, tasks, alpha=0.5, roles=roles, layer_types={}, device="cpu")
    by_name = merge_updates("ta", base, tasks, alpha=0.5, roles=roles, layer_types={}, device="cpu")
    assert torch.equal(by_alias["w"], by_name["w"]) and torch.allclose(by_name["w"], torch.full((3, 2), 1.5))


def _throwaway(name, aliases):
    return Method(MethodSpec(name, "t", (alpha_param(1.0, 2.0),), "t", aliases=aliases), lambda ctx, alpha: {})


@pytest.mark.parametrize("name,aliases", [("_hostile_x", ("ta",)),                # alias = a method's name
                                          ("_hostile_x", ("task_arithmetic",)),   # alias = another's alias
                                          ("task_arithmetic", ()),                # name = another's alias
                                          ("_hostile_x", ("_y", "_y")),           # repeated
                                          ("_hostile_x", ("_hostile_x",))])       # alias = own name
def test_alias_collisions_refused(name, aliases):
    before = (dict(METHODS), dict(registry.ALIASES))
    with pytest.raises(ValueError, match="registered twice|alias"):
        register(_throwaway(name, aliases))
    assert (dict(METHODS), dict(registry.ALIASES)) == before          # nothing half-registered


def test_methods_listing_shows_aliases(capsys):
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "also accepted as: dare_linear" in out and "task_arithmetic" in out
    assert cli.main(["methods", "--json"]) == 0
    rows = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert "task_arithmetic" in rows["ta"]["aliases"] and "dare_linear" in rows["dare_ta"]["aliases"]
    assert rows["esm"]["aliases"] == []


def test_unknown_method_message_lists_aliases():
    with pytest.raises(ValueError, match="unknown method 'dare_lineer'.*dare_linear"):
        get_method("dare_lineer")


# --------------------------------------------------------------------------- (6) finite in float32


def _tiny64(seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"visual.transformer.resblocks.0.mlp.c_fc.weight": torch.randn(6, 4, generator=g, dtype=torch.float64),
            "visual.transformer.resblocks.0.mlp.c_fc.bias": torch.randn(6, generator=g, dtype=torch.float64),
            "visual.proj": torch.randn(4, 3, generator=g, dtype=torch.float64)}


KEY = "visual.transformer.resblocks.0.mlp.c_fc.weight"


def test_float64_value_that_overflows_float32_refused_on_load(tmp_path):
    from esm_core.checkpoints import CheckpointError, load_checkpoint
    sd = _tiny64(1)
    sd[KEY][2, 1] = 1e300                         # finite as float64, inf as float32
    assert torch.isfinite(sd[KEY]).all() and not torch.isfinite(sd[KEY].float()).all()
    torch.save(sd, tmp_path / "huge.pt")
    for kw in ({}, {"base": _tiny64(0)}):
        with pytest.raises(CheckpointError, match=rf"too large for float32.*{KEY}"):
            load_checkpoint(tmp_path / "huge.pt", **kw)
    from safetensors.torch import save_file
    save_file(sd, str(tmp_path / "huge.safetensors"))
    with pytest.raises(CheckpointError, match=rf"huge.safetensors.*too large for float32.*{KEY}"):
        load_checkpoint(tmp_path / "huge.safetensors")


def test_largest_float32_value_still_accepted(tmp_path):
    from esm_core.checkpoints import check_compatible, load_checkpoint
    sd = _tiny64(1)
    sd[KEY][0, 0] = float(torch.finfo(torch.float32).max)
    sd[KEY][0, 1] = -float(torch.finfo(torch.float32).max)
    check_compatible(_tiny64(0), sd, "edge")
    torch.save(sd, tmp_path / "edge.pt")
    assert load_checkpoint(tmp_path / "edge.pt")[KEY][0, 0] == sd[KEY][0, 0]


def test_check_compatible_names_the_overflowing_key():
    from esm_core.checkpoints import CheckpointError, check_compatible
    sd = _tiny64(1)
    sd["visual.proj"][0, 0] = -1e300
    with pytest.raises(CheckpointError, match=r"checkpoint 'cars'.*too large for float32.*visual\.proj"):
        check_compatible(_tiny64(0), sd, "cars")


@pytest.mark.parametrize("where", ["base", "task"])
@pytest.mark.parametrize("method", ["ta", "esm"])
def test_merge_refuses_state_dicts_that_overflow_float32(where, method):
    from esm_core.checkpoints import CheckpointError
    from esm_core.merging import merge
    base, tasks = _tiny64(0), {"a": _tiny64(1), "b": _tiny64(2)}
    (base if where == "base" else tasks["b"])[KEY][1, 1] = 1e300
    with pytest.raises(CheckpointError, match=rf"'{'base' if where == 'base' else 'b'}'.*too large for float32.*{KEY}"):
        merge(method, base, tasks, device="cpu", inputs={})


def test_merge_never_returns_non_finite_weights():
    """Finite float32 inputs whose difference overflows: θt − θ0 = 3e38 − (−3e38) = inf."""
    from esm_core.merging import merge
    base = {k: v.float() for k, v in _tiny64(0).items()}
    tasks = {"a": {k: v.clone() for k, v in base.items()}, "b": {k: v.clone() for k, v in base.items()}}
    base["visual.proj"][0, 0] = -3e38
    tasks["a"]["visual.proj"][0, 0] = 3e38
    with pytest.raises(ValueError, match=r"non-finite values.*visual\.proj"):
        merge("ta", base, tasks, device="cpu", alpha=1.0)


# --------------------------------------------------------------------------- (7) strict JSON


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_safetensors_metadata_is_strict_json(tmp_path, bad):
    from esm_core.checkpoints import CheckpointError, save_safetensors
    sd = {"w": torch.ones(2)}
    with pytest.raises(CheckpointError, match=r"out\.safetensors: merge config: \['params'\]\['alpha'\] is not a "
                                              r"finite number"):
        save_safetensors(sd, tmp_path / "out.safetensors", {"method": "ta", "params": {"alpha": bad}})
    assert list(tmp_path.iterdir()) == []                     # nothing written, not even a temp file
    save_safetensors(sd, tmp_path / "ok.safetensors", {"params": {"alpha": 0.5}})
    from esm_core.checkpoints import read_config
    assert read_config(tmp_path / "ok.safetensors") == {"params": {"alpha": 0.5}}


def test_strict_json_dumps_names_the_entry():
    from esm_core.checkpoints import strict_json_dumps
    assert json.loads(strict_json_dumps({"a": [1, 2.5]})) == {"a": [1, 2.5]}
    with pytest.raises(ValueError, match=r"x: \['rows'\]\[1\]\['norm'\] is not a finite number"):
        strict_json_dumps({"rows": [{"norm": 1.0}, {"norm": float("nan")}]}, "x")


@pytest.fixture
def sess():
    from fake_pool import make_fake_pool
    from esm_core import studio as S
    pool = make_fake_pool()
    s = S.new_session("cpu", live_per_task=8, alpha_per_task=8)
    S.load_demo(s, loader=lambda: pool)
    yield s
    S.close(s)


def test_session_refuses_nan_alpha_and_exports_strict_json(sess):
    from esm_core import studio as S
    for bad in (float("nan"), "nan", float("inf")):
        with pytest.raises(ValueError, match="'alpha' must be a finite number"):
            S.merge(sess, "ta", {"alpha": bad})
    S.merge(sess, "task_arithmetic", {"alpha": 0.4})                  # the alias works in a session too
    json.loads(S.export_config(sess).read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
    before = sorted(p.name for p in sess.workdir.iterdir())
    sess.current["summary"]["mean_norm"] = float("nan")                # e.g. a fine-tuned accuracy of 0
    with pytest.raises(ValueError, match=r"\['summary'\]\['mean_norm'\] is not a finite number"):
        S.export_config(sess)
    with pytest.raises(ValueError, match=r"\['summary'\]\['mean_norm'\] is not a finite number"):
        S.export_merged(sess)                                          # the recipe in the export's metadata
    assert sorted(p.name for p in sess.workdir.iterdir()) == before    # nothing half-written


# --------------------------------------------------------------------------- (8) names


@pytest.mark.parametrize("name", ["cars\n", "cars\r\n", "cars\nx", "\ncars", "", "-cars", "a" * 65, "ca rs"])
def test_task_names_with_a_trailing_newline_refused(name, tmp_path):
    from esm_core import studio as S
    s = S.new_session("cpu")
    try:
        with pytest.raises(ValueError, match="task names must be"):
            S.load_uploaded(s, tmp_path / "base.pt", {name: tmp_path / "a.pt", "dtd": tmp_path / "b.pt"})
    finally:
        S.close(s)


def test_hf_layer_keys_with_a_trailing_newline_are_not_renamed():
    from esm_core.checkpoints import CheckpointError, hf_clip_vision_to_open_clip
    sd = {"vision_model.encoder.layers.0.mlp.fc1.weight\n": torch.ones(2, 2)}
    with pytest.raises(CheckpointError, match="does not know"):
        hf_clip_vision_to_open_clip(sd)


# --------------------------------------------------------------------------- (8) deep pickles


def _save_chain(path, depth: int) -> list[str]:
    """torch.save a chain of ``depth`` nested modules of a class from a fake package (so the loader stubs it)."""
    import threading
    from test_checkpoints import _fake_module, _place
    mod, cleanup = _fake_module("hostile.deep")
    try:
        class Node(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(torch.randn(2))
                self.register_buffer("b", torch.zeros(1))
        _place(mod, Node, "Node")
        root = cur = Node()
        for _ in range(depth):
            cur._modules["c"] = Node()
            cur = cur._modules["c"]
        cur._modules["z"] = Node()                       # a second child at the bottom: order is depth first
        expected, err = [], []

        def save():                                      # pickling (and state_dict) recurse: give them room
            old = sys.getrecursionlimit()
            sys.setrecursionlimit(max(old, 20 * depth + 1000))
            try:
                expected.extend(root.state_dict())
                torch.save(root, path)
            except BaseException as e:                   # pragma: no cover
                err.append(e)
            finally:
                sys.setrecursionlimit(old)
        old_stack = threading.stack_size(256 * 1024 * 1024)
        try:
            t = threading.Thread(target=save)
            t.start()
            t.join()
        finally:
            threading.stack_size(old_stack)
        assert not err, err
        return expected
    finally:
        cleanup()


def test_5000_deep_pickled_module_refused_clearly(tmp_path):
    from esm_core.checkpoints import CheckpointError, load_checkpoint
    _save_chain(tmp_path / "deep.pt", 5000)
    assert "hostile" not in sys.modules
    with pytest.raises(CheckpointError, match=r"deep\.pt: modules nested more than 100 levels deep"):
        load_checkpoint(tmp_path / "deep.pt")


def test_nested_module_within_the_bound_read_in_state_dict_order(tmp_path):
    from esm_core.checkpoints import load_checkpoint
    expected = _save_chain(tmp_path / "ok.pt", 60)
    sd = load_checkpoint(tmp_path / "ok.pt")
    assert list(sd) == expected and len(sd) == 2 * 62


def test_walk_bound_is_a_parameter():
    from esm_core.checkpoints import CheckpointError
    from esm_core.pickled import _walk_module

    class Stub:
        pass
    root = cur = Stub()
    for _ in range(3):
        nxt = Stub()
        cur._modules, cur._parameters = {"c": nxt}, {"w": torch.ones(1)}
        cur = nxt
    out = {}
    _walk_module(root, "", out, set(), max_depth=3)
    assert list(out) == ["w", "c.w", "c.c.w"]
    with pytest.raises(CheckpointError, match="more than 2 levels"):
        _walk_module(root, "", {}, set(), max_depth=2)


# --------------------------------------------------------------------------- (8) ESM rank


def test_esm_rank_has_a_documented_max():
    p = next(q for q in get_method("esm").params if q.name == "rank")
    assert p.max == 65_536 and "65536" in p.help and "clamped" in p.help
    with pytest.raises(ValueError, match="parameter 'rank' must be <= 65536"):
        get_method("esm").resolve({"rank": 1_000_000})
    assert get_method("esm").resolve({"rank": 65_536})["rank"] == 65_536


def test_esm_rank_clamp_is_noted():
    from esm_core.merging.esm import esm_rank
    info = {}
    assert esm_rank(24, 3, rank=99, info=info) == 24 and esm_rank(12, 3, rank=99, info=info) == 12
    assert esm_rank(12, 3, rank=99, info=info) == 12
    assert info["notes"] == ["ESM: rank 99 is more than a layer's 24 output dimensions; k = 24 (all of them) used there",
                             "ESM: rank 99 is more than a layer's 12 output dimensions; k = 12 (all of them) used there"]
    quiet = {}
    assert esm_rank(24, 3, rank=5, info=quiet) == 5 and esm_rank(24, 3, info=quiet) == 8 and quiet == {}
    assert esm_rank(24, 3, rank_fraction=0.01, info=quiet) == 1 and "k = 1 used" in quiet["notes"][0]
    assert esm_rank(24, 1, rank_fraction=4.0, info=quiet) == 24 and "rank_fraction 4 (k = 96)" in quiet["notes"][1]


def test_esm_merge_with_a_rank_above_d_out_reports_the_clamp():
    from test_esm import _case
    from esm_core.merging import merge_updates
    base, tasks, inputs = _case(T=2)
    info = {}
    big = merge_updates("esm", base, tasks, inputs=inputs, rank=5000, info=info)
    assert any("rank 5000 is more than a layer's 24 output dimensions" in n for n in info["notes"])
    assert any("12 output dimensions" in n for n in info["notes"])
    full = merge_updates("esm", base, tasks, inputs=inputs, rank=24)      # ≥ every d_out here: the same merge
    assert set(big) == set(full) and all(torch.equal(big[k], full[k]) for k in full)


# --------------------------------------------------------------------------- (8) swapped checkpoints


def test_suspicious_references_flags_a_finetuned_model_below_zero_shot():
    from esm_core.evaluation.accuracy import suspicious_references
    zs = {"cars": 0.60, "dtd": 0.45, "svhn": 0.30}
    ft = {"cars": 0.20, "dtd": 0.44, "svhn": 0.95}          # cars swapped; dtd one point under zero-shot
    w = suspicious_references(ft, zs)
    assert len(w) == 2 and w[0].startswith("task 'cars': its fine-tuned model scores 20.0 %") and "60.0 %" in w[0]
    assert "swapped" in w[0] and w[1].startswith("task 'dtd'")
    assert [x.split("'")[1] for x in suspicious_references(ft, zs, margin=0.05)] == ["cars"]   # dtd within noise
    assert suspicious_references({"a": 0.9}, {"a": 0.9}) == []                                 # equal: fine
    assert suspicious_references({"a": 0.1}, {}) == []                                         # no reference
    with pytest.raises(ValueError, match="margin"):
        suspicious_references(ft, zs, margin=float("nan"))


def _fake_eval_pool(monkeypatch):
    from test_evaluate import FakePool
    from esm_core.cli import eval as E
    pool = FakePool([0.5], [1], task_w=0.5)
    pool.task_names = ["cars", "dtd"]
    pool.cache[("reference_accuracies", "test")] = {"zeroshot": {"cars": 0.5, "dtd": 0.4},
                                                    "finetuned": {"cars": 0.9, "dtd": 0.157}}   # dtd: swapped
    monkeypatch.setattr(E, "load_pool_arg", lambda spec: pool)
    return pool


def test_eval_cli_prints_the_warning(monkeypatch, capsys):
    _fake_eval_pool(monkeypatch)
    assert cli.main(["eval", "--method", "zeroshot", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "155.17" in out           # mean normalised zero-shot: (0.5/0.9 + 0.4/0.157) / 2, i.e. 254.8 % on dtd
    assert "warning: task 'dtd': its fine-tuned model scores 15.7 %" in out and "cars" not in out.split("warning")[1]
    assert cli.main(["eval", "--method", "zeroshot", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["warnings"]) == 1 and res["warnings"][0].startswith("task 'dtd'")


# --------------------------------------------------------------------------- (8) .ckpt


def test_every_listed_extension_is_read(tmp_path):
    """CHECKPOINT_EXTS is what an upload box should accept: each one really loads (.ckpt included)."""
    from esm_core.checkpoints import CHECKPOINT_EXTS, CheckpointError, load_checkpoint
    from safetensors.torch import save_file
    assert ".ckpt" in CHECKPOINT_EXTS
    sd = {k: v.float() for k, v in _tiny64().items()}
    for ext in CHECKPOINT_EXTS:
        p = tmp_path / f"m{ext}"
        save_file(sd, str(p)) if ext == ".safetensors" else torch.save({"state_dict": sd, "epoch": 3}, p)
        got = load_checkpoint(p)
        assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd), ext
    with pytest.raises(CheckpointError, match=r"expected one of \.safetensors, \.pt, \.pth, \.bin, \.ckpt"):
        load_checkpoint(tmp_path / "m.onnx")


def test_merged_weights_that_overflow_the_base_dtype_refused():
    """A float16 base: θ0 + update is computed in float32 but stored as float16, whose max is 65504."""
    from esm_core.merging import apply_updates, merge
    base = {"w": torch.full((2, 2), 60000.0, dtype=torch.float16), "b": torch.zeros(2, dtype=torch.float16)}
    tasks = {"a": {"w": torch.full((2, 2), 65000.0, dtype=torch.float16), "b": torch.ones(2, dtype=torch.float16)}}
    ok = merge("ta", base, tasks, alpha=0.5, roles={"w": "matrix", "b": "vector"}, layer_types={}, device="cpu")
    assert ok["w"].dtype == torch.float16 and torch.isfinite(ok["w"]).all()
    with pytest.raises(ValueError, match=r"not finite once stored in the base's dtype \(torch.float16\) in w"):
        merge("ta", base, tasks, alpha=2.0, roles={"w": "matrix", "b": "vector"}, layer_types={}, device="cpu")
    with pytest.raises(ValueError, match="in w"):
        apply_updates(base, {"w": torch.full((2, 2), 1e5)})


def test_apply_updates_consume_hands_each_update_back_once_added():
    """``consume=True`` (merged_state): the same merged weights, and the updates dict emptied key by key (the
    base's other keys copied, an update of a key the base lacks left in place)."""
    import weakref
    from esm_core.merging import apply_updates
    base = {"w": torch.ones(2, 2), "b": torch.zeros(2), "n": torch.tensor(3)}
    ups = {"w": torch.full((2, 2), 0.5), "b": torch.ones(2), "x": torch.zeros(1)}
    want = apply_updates(base, ups)
    gone = weakref.ref(ups["w"])
    got = apply_updates(base, ups, consume=True)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert list(ups) == ["x"] and gone() is None                   # w's update freed once added
    assert got["n"].data_ptr() != base["n"].data_ptr()


def test_eval_cli_prints_where_the_alpha_search_went_past_its_grid(monkeypatch, capsys):
    import esm_core.evaluation as EV
    _fake_eval_pool(monkeypatch)

    def past_the_grid(pool, method, params=None, **kw):          # a summary as evaluate_method gives it
        return {**EV.summarize(pool, {"cars": 0.7, "dtd": 0.3}, "test"), "method": method, "alpha": 1.2,
                "alpha_extended": [1.1, 1.2], "alpha_note": "the best α was the grid's upper end (1)"}
    monkeypatch.setattr(EV, "evaluate_method", past_the_grid)
    assert cli.main(["eval", "--method", "ta", "--quiet"]) == 0
    assert "note (ta): the best α was the grid's upper end (1)" in capsys.readouterr().out
    assert cli.main(["eval", "--method", "ta", "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"]["ta"]["alpha_note"].startswith("the best α")
