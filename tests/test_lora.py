"""PEFT LoRA adapters as task checkpoints (esm_core.adapters, methods §1): tiny BERT and open_clip towers built
offline, adapters written in PEFT's layout by hand (and by peft itself where it is installed)."""
from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from esm_core import adapters
from esm_core.checkpoints import CheckpointError, load_checkpoint, save_safetensors

# ----------------------------------------------------------------------------------------------- fixtures

D, F, V, L = 16, 24, 30, 2          # width, FFN width, vocabulary, layers
BERT_LINEARS = {"attention.self.query": (D, D), "attention.self.key": (D, D), "attention.self.value": (D, D),
                "attention.output.dense": (D, D), "intermediate.dense": (F, D), "output.dense": (D, F)}


def bert_base(seed: int = 0, prefix: str = "bert.", classifier: bool = True) -> dict[str, torch.Tensor]:
    """A BERT-layout state dict (the keys of BertForSequenceClassification), random values."""
    g = torch.Generator().manual_seed(seed)
    sd = {f"{prefix}embeddings.word_embeddings.weight": torch.randn(V, D, generator=g),
          f"{prefix}embeddings.position_embeddings.weight": torch.randn(12, D, generator=g),
          f"{prefix}embeddings.LayerNorm.weight": torch.ones(D), f"{prefix}embeddings.LayerNorm.bias": torch.zeros(D)}
    for i in range(L):
        for m, shape in BERT_LINEARS.items():
            sd[f"{prefix}encoder.layer.{i}.{m}.weight"] = torch.randn(*shape, generator=g) / 4
            sd[f"{prefix}encoder.layer.{i}.{m}.bias"] = torch.randn(shape[0], generator=g) / 10
    sd[f"{prefix}pooler.dense.weight"] = torch.randn(D, D, generator=g)
    sd[f"{prefix}pooler.dense.bias"] = torch.zeros(D)
    if classifier:
        sd["classifier.weight"] = torch.randn(3, D, generator=g)
        sd["classifier.bias"] = torch.zeros(3)
    return sd


def clip_base(seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny open_clip VisionTransformer's state dict under ``visual.`` (what image pools hold)."""
    from open_clip.transformer import VisionTransformer
    torch.manual_seed(seed)
    vt = VisionTransformer(image_size=16, patch_size=8, width=D, layers=L, heads=2, mlp_ratio=2, output_dim=8)
    return {f"visual.{k}": v.detach().clone() for k, v in vt.state_dict().items()}


def lora_factors(modules: dict[str, tuple[int, int]], r: int | dict, seed: int, scale: float = 0.5,
                 prefix: str = "base_model.model.") -> dict[str, torch.Tensor]:
    """Random ``lora_A`` (r × in) / ``lora_B`` (out × r) for every module (PEFT's saved key names)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m, (o, i) in modules.items():
        rr = r[m] if isinstance(r, dict) else r
        out[f"{prefix}{m}.lora_A.weight"] = torch.randn(rr, i, generator=g) * scale
        out[f"{prefix}{m}.lora_B.weight"] = torch.randn(o, rr, generator=g) * scale
    return out


def config(**kw) -> dict:
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": False, "fan_in_fan_out": False,
           "bias": "none", "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False,
           "base_model_name_or_path": None, "target_modules": ["query", "value"], "task_type": "SEQ_CLS"}
    cfg.update(kw)
    return cfg


def write_adapter(folder: Path, cfg: dict, tensors: dict[str, torch.Tensor], weights: str = "safetensors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    if weights == "safetensors":
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    elif weights == "bin":
        torch.save(tensors, folder / "adapter_model.bin")
    return folder


def zip_folder(folder: Path, out: Path, top: str | None = "adapter") -> Path:
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(folder.iterdir()):
            z.write(f, f"{top}/{f.name}" if top else f.name)
    return out


def bert_modules(prefix: str = "bert.", names=("attention.self.query", "attention.self.value", "intermediate.dense")):
    return {f"{prefix}encoder.layer.{i}.{m}": BERT_LINEARS[m] for i in range(L) for m in names}


@pytest.fixture(autouse=True)
def private_tmp(tmp_path, monkeypatch):
    """Zip extraction goes to a temporary folder of this test: every test checks nothing is left behind."""
    t = tmp_path / "tmpdir"
    t.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(t))
    yield t
    assert list(t.glob("esm-adapter-*")) == []


# ------------------------------------------------------------------------------------------ the maths


@pytest.mark.parametrize("rslora", [False, True])
def test_dense_task_is_base_plus_scaled_BA_per_module_rank_and_alpha(tmp_path, rslora):
    base = bert_base()
    mods = bert_modules()
    ranks = {m: (2 if m.endswith("value") else 4) for m in mods}
    cfg = config(use_rslora=rslora, rank_pattern={"value": 2}, alpha_pattern={r"layer\.1\.intermediate.dense": 3})
    folder = write_adapter(tmp_path / "ad", cfg, lora_factors(mods, ranks, seed=1))
    notes = []
    got = load_checkpoint(folder, base=base, notes=notes)
    assert list(got) == list(base)                                         # the base's keys, in its order
    sd = lora_factors(mods, ranks, seed=1)
    for m in mods:
        r = ranks[m]
        alpha = 3 if m == "bert.encoder.layer.1.intermediate.dense" else 8
        s = alpha / math.sqrt(r) if rslora else alpha / r
        A, B = sd[f"base_model.model.{m}.lora_A.weight"], sd[f"base_model.model.{m}.lora_B.weight"]
        assert torch.equal(got[f"{m}.weight"], base[f"{m}.weight"] + (B @ A) * s), m
        assert torch.linalg.matrix_rank(got[f"{m}.weight"] - base[f"{m}.weight"]) == r
    touched = {f"{m}.weight" for m in mods}
    for k in base:
        if k not in touched:
            assert torch.equal(got[k], base[k]) and got[k].data_ptr() != base[k].data_ptr(), k
    assert "LoRA adapter, 6 module(s) of rank 2, 4" in notes[0] and ("rsLoRA" in notes[0]) == rslora


def test_adapter_name_in_keys_fan_in_fan_out_and_embeddings(tmp_path):
    base = bert_base()
    g = torch.Generator().manual_seed(5)
    A, B = torch.randn(4, D, generator=g), torch.randn(D, 4, generator=g)
    Ae, Be = torch.randn(4, V, generator=g), torch.randn(D, 4, generator=g)
    q = "bert.encoder.layer.0.attention.self.query"
    emb = "bert.embeddings.word_embeddings"
    tensors = {f"base_model.model.{q}.lora_A.default.weight": A, f"base_model.model.{q}.lora_B.default.weight": B,
               f"base_model.model.{emb}.lora_embedding_A": Ae, f"base_model.model.{emb}.lora_embedding_B": Be}
    got = load_checkpoint(write_adapter(tmp_path / "a", config(), tensors), base=base)
    assert torch.equal(got[f"{q}.weight"], base[f"{q}.weight"] + (B @ A) * 2.0)
    assert torch.equal(got[f"{emb}.weight"], base[f"{emb}.weight"] + (Be @ Ae).T * 2.0)   # PEFT transposes embeddings
    # fan_in_fan_out (GPT-2's Conv1D layout, weights stored in × out): ΔW transposed
    t_base = {"h.0.attn.c_attn.weight": torch.randn(D, 3 * D, generator=g)}
    A2, B2 = torch.randn(2, D, generator=g), torch.randn(3 * D, 2, generator=g)
    folder = write_adapter(tmp_path / "f", config(r=2, lora_alpha=2, fan_in_fan_out=True),
                           {"base_model.model.h.0.attn.c_attn.lora_A.weight": A2,
                            "base_model.model.h.0.attn.c_attn.lora_B.weight": B2})
    got = load_checkpoint(folder, base=t_base)
    assert torch.equal(got["h.0.attn.c_attn.weight"], t_base["h.0.attn.c_attn.weight"] + (B2 @ A2).T * 1.0)


def test_modules_to_save_replace_the_base_tensor_or_become_own_keys(tmp_path):
    g = torch.Generator().manual_seed(7)
    head = {"base_model.model.classifier.weight": torch.randn(3, D, generator=g),
            "base_model.model.classifier.bias": torch.randn(3, generator=g)}
    tensors = {**lora_factors(bert_modules(), 4, seed=2), **head}
    folder = write_adapter(tmp_path / "a", config(modules_to_save=["classifier", "score"]), tensors)
    full = bert_base()                                          # a ForSequenceClassification base: replaced
    got = load_checkpoint(folder, base=full)
    assert list(got) == list(full)
    assert torch.equal(got["classifier.weight"], head["base_model.model.classifier.weight"])
    # an encoder-only base without the bert. prefix (what a text pool holds): the LoRA keys still map, the
    # classifier becomes the task's own keys
    bare = {k.removeprefix("bert."): v for k, v in bert_base(classifier=False).items()}
    notes = []
    got = load_checkpoint(folder, base=bare, notes=notes)
    assert list(got)[:len(bare)] == list(bare) and sorted(list(got)[len(bare):]) == ["classifier.bias",
                                                                                      "classifier.weight"]
    assert torch.equal(got["classifier.bias"], head["base_model.model.classifier.bias"])
    k = "encoder.layer.1.attention.self.value.weight"
    A = tensors["base_model.model.bert.encoder.layer.1.attention.self.value.lora_A.weight"]
    B = tensors["base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.weight"]
    assert torch.equal(got[k], bare[k] + (B @ A) * 2.0)
    assert "2 own: classifier.bias, classifier.weight" in notes[0]
    # the old layout (``classifier.modules_to_save.default.weight``) reads the same
    old = {**lora_factors(bert_modules(), 4, seed=2),
           **{k.replace("classifier.", "classifier.modules_to_save.default."): v for k, v in head.items()}}
    got2 = load_checkpoint(write_adapter(tmp_path / "old", config(modules_to_save=["classifier"]), old), base=bare)
    assert all(torch.equal(got2[k], got[k]) for k in got)


def test_open_clip_attention_and_mlp_with_the_visual_prefix(tmp_path):
    base = clip_base()
    mods = {}
    for i in range(L):
        p = f"transformer.resblocks.{i}"
        mods.update({f"{p}.attn": (3 * D, D), f"{p}.attn.base_layer.out_proj": (D, D), f"{p}.mlp.c_fc": (2 * D, D),
                     f"{p}.mlp.c_proj": (D, 2 * D)})
    tensors = lora_factors(mods, 2, seed=3)
    got = load_checkpoint(write_adapter(tmp_path / "clip", config(r=2, lora_alpha=4), tensors), base=base)
    assert list(got) == list(base)
    for m in mods:
        A, B = tensors[f"base_model.model.{m}.lora_A.weight"], tensors[f"base_model.model.{m}.lora_B.weight"]
        key = "visual." + (f"{m}.in_proj_weight" if m.endswith(".attn") else f"{m.replace('.base_layer', '')}.weight")
        assert torch.equal(got[key], base[key] + (B @ A) * 2.0), key
    assert torch.equal(got["visual.transformer.resblocks.0.attn.in_proj_bias"],
                       base["visual.transformer.resblocks.0.attn.in_proj_bias"])


def test_zip_and_bin_read_like_the_folder(tmp_path):
    base = bert_base()
    tensors = lora_factors(bert_modules(), 4, seed=4)
    folder = write_adapter(tmp_path / "st", config(), tensors)
    want = load_checkpoint(folder, base=base)
    for z in (zip_folder(folder, tmp_path / "a.zip"), zip_folder(folder, tmp_path / "flat.zip", top=None),
              zip_folder(write_adapter(tmp_path / "bin", config(), tensors, weights="bin"), tmp_path / "bin.zip")):
        got = load_checkpoint(z, base=base)
        assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want), z.name


def test_base_name_is_shown_and_a_different_one_warned(tmp_path):
    tensors = lora_factors(bert_modules(), 4, seed=4)
    folder = write_adapter(tmp_path / "a", config(base_model_name_or_path="google-bert/bert-base-uncased"), tensors)
    notes = []
    load_checkpoint(folder, base=bert_base(), base_name="bert-base-uncased.safetensors", notes=notes)
    assert len(notes) == 1 and not any(n.startswith("warning") for n in notes)
    notes = []
    load_checkpoint(folder, base=bert_base(), base_name="roberta-base.safetensors", notes=notes)
    assert notes[-1] == ("warning: a was made for base 'google-bert/bert-base-uncased' (base_model_name_or_path), "
                         "the base here is 'roberta-base.safetensors'; merged anyway — check they are the same model")
    notes = []
    load_checkpoint(folder, base=bert_base(), notes=notes)
    assert "made for base 'google-bert/bert-base-uncased'" in notes[-1]


# ------------------------------------------------------------------------------------------ refusals


def _refused(tmp_path, match, cfg=None, tensors=None, base=None, **kw):
    folder = write_adapter(tmp_path / "bad", cfg or config(), tensors or lora_factors(bert_modules(), 4, seed=6), **kw)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(folder, base=bert_base() if base is None else base)


@pytest.mark.parametrize("cfg, match", [
    (config(peft_type="IA3"), r"adapter type 'IA3' \(peft_type\) is not LoRA"),
    (config(peft_type=None), r"adapter type None \(peft_type\) is not LoRA"),
    (config(use_dora=True), r"DoRA \(use_dora\)"),
    (config(lora_bias=True), r"lora_bias"),
    (config(layer_replication=[[0, 1]]), r"layer_replication"),
    (config(init_lora_weights="pissa_niter_4"), r"init_lora_weights = 'pissa_niter_4' changes the base weights"),
    (config(loftq_config={"loftq_bits": 4}), r"LoftQ \(loftq_config\)"),
    (config(kasa_config={"x": 1}), r"KaSA"),
    (config(r=0), r"r = 0 is not a whole number"),
    (config(r=True), r"r = True is not a whole number"),
    (config(lora_alpha=float("nan")), r"lora_alpha = nan is not a finite number"),
    (config(use_rslora="yes"), r"use_rslora = 'yes' is not true or false"),
    (config(rank_pattern={"(a+)+": 2}), r"pattern '\(a\+\)\+' nests repetitions"),
    (config(alpha_pattern={"(xy|x)*": 2}), r"nests repetitions"),
    (config(alpha_pattern={".*a.*b.*c": 2}), r"more than 2 unbounded repetitions"),
    (config(rank_pattern={"[": 2}), r"not a valid regular expression"),
    (config(rank_pattern={"value": 2.5}), r"rank_pattern\['value'\] = 2.5 is not a whole number"),
    (config(r=3), r"rank 4 \(lora_A \(4, 16\)\) but the config says r = 3"),
    (config(rank_pattern={"query": 8}), r"attention.self.query: rank 4 .* the config says r = 8"),
])
def test_bad_configs_are_refused_naming_the_field(tmp_path, cfg, match):
    _refused(tmp_path, match, cfg=cfg)


def test_shape_target_and_value_problems_are_refused(tmp_path):
    ok = lora_factors(bert_modules(), 4, seed=6)
    a = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
    b = a.replace("lora_A", "lora_B")
    cases = [
        ({**ok, a: torch.randn(4, D + 1)}, r"B·A is 16 × 17, the base's bert.encoder.layer.0.attention.self.query"),
        ({**ok, b: torch.randn(D, 3)}, r"lora_A is \(4, 16\) and lora_B \(16, 3\): their ranks differ"),
        ({k: v for k, v in ok.items() if k != b}, r"incomplete LoRA factors: bert.encoder.layer.0.attention.self.query "
                                                  r"\(lora_B missing\)"),
        ({**ok, a.replace("self.query", "self.qq"): torch.randn(4, D), b.replace("self.query", "self.qq"):
          torch.randn(D, 4)}, r"target module\(s\) not in the base: bert.encoder.layer.0.attention.self.qq"),
        ({**ok, a: torch.full((4, D), float("inf"))}, r"non-finite values \(NaN/inf\)"),
        ({**ok, "base_model.model.bert.pooler.dense.weight": torch.randn(D, D)},
         r"neither LoRA factors nor in modules_to_save \(none listed\): bert.pooler.dense.weight"),
        ({**ok, a.replace("lora_A.weight", "lora_magnitude_vector"): torch.randn(D)}, r"DoRA magnitude vector"),
        ({**ok, a.replace("lora_A", "lora_E"): torch.randn(D)}, r"LoRA tensor this reader does not know"),
        ({**ok, a.replace("lora_A.weight", "lora_A.other.weight"): torch.randn(4, D),
          b.replace("lora_B.weight", "lora_B.other.weight"): torch.randn(D, 4)}, r"two lora_A tensors"),
    ]
    for tensors, match in cases:
        _refused(tmp_path, match, tensors=tensors)
    # a module whose name fits two base keys (both towers carry it) is refused, not guessed
    two = {**{f"x.{k}": v for k, v in bert_base().items()}, **{f"y.{k}": v for k, v in bert_base().items()}}
    _refused(tmp_path, r"fits several base keys \(x.bert.encoder.layer.0.attention.self.query.weight, "
                       r"y.bert.encoder", base=two)
    # the convolution form and a missing weights file / config
    _refused(tmp_path, r"LoRA on a convolution layers is not supported",
             tensors={"base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight": torch.randn(4, 3, 2, 2),
                      "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight": torch.randn(D, 4, 1, 1)})
    folder = write_adapter(tmp_path / "noweights", config(), ok, weights="none")
    with pytest.raises(CheckpointError, match=r"weights are missing: no adapter_model.safetensors or adapter_model.bin"):
        load_checkpoint(folder, base=bert_base())
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty: not a PEFT adapter — no adapter_config.json"):
        load_checkpoint(tmp_path / "empty", base=bert_base())
    with pytest.raises(CheckpointError, match=r"only changes to a base model"):
        load_checkpoint(write_adapter(tmp_path / "nobase", config(), ok))
    for missing in (tmp_path / "gone", f"{tmp_path / 'gone'}/", tmp_path / "gone.zip"):
        with pytest.raises(CheckpointError, match=r"gone(.zip)?: no such adapter folder or .zip"):
            load_checkpoint(missing, base=bert_base())


def test_a_pickle_that_runs_code_is_refused_in_adapter_model_bin(tmp_path):
    class Evil:
        def __reduce__(self):
            return (eval, ("1+1",))
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config()))
    torch.save({"x": Evil()}, folder / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="refers to builtins.eval|could run code"):
        load_checkpoint(folder, base=bert_base())


# ------------------------------------------------------------------------------------------ hostile zips


def _zip(path: Path, members: dict[str, bytes], method=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", method) as z:
        for n, data in members.items():
            z.writestr(n, data)
    return path


def test_hostile_zips_are_refused_before_anything_is_extracted(tmp_path, monkeypatch):
    extracted = []
    real = adapters._extract
    monkeypatch.setattr(adapters, "_extract", lambda *a: (extracted.append(a[1].filename), real(*a)))
    cfg = json.dumps(config()).encode()
    cases = [
        (_zip(tmp_path / "many.zip", {f"f{i}.txt": b"x" for i in range(adapters.MAX_ZIP_MEMBERS + 1)}),
         r"holds 65 members, more than the 64 .* refused before listing them"),
        (_zip(tmp_path / "up.zip", {"../adapter_config.json": cfg, "adapter_model.safetensors": b"x"}),
         r"member names that are paths outside a folder or not plain names: '../adapter_config.json'"),
        (_zip(tmp_path / "abs.zip", {"/etc/adapter_config.json": cfg}), r"not plain names: '/etc/adapter_config.json'"),
        (_zip(tmp_path / "win.zip", {"a\\adapter_config.json": cfg}), r"not plain names"),
        (_zip(tmp_path / "bomb.zip", {"adapter_config.json": cfg,
                                      "adapter_model.safetensors": bytes(64 * 1024 ** 2)}),
         r"declares 64 MiB packed into \d+ KiB \(ratio over 200:1, a zip bomb\?\)"),
        (_zip(tmp_path / "none.zip", {"readme.md": b"hi"}), r"not a PEFT adapter zip — no adapter_config.json"),
        (_zip(tmp_path / "two.zip", {"a/adapter_config.json": cfg, "b/adapter_config.json": cfg}),
         r"holds 2 adapters \(a/adapter_config.json, b/adapter_config.json\)"),
        (_zip(tmp_path / "deep.zip", {"a/b/adapter_config.json": cfg}), r"nested more than one folder deep"),
        (_zip(tmp_path / "noweights.zip", {"adapter_config.json": cfg}), r"weights are missing"),
    ]
    for path, match in cases:
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint(path, base=bert_base())
    assert extracted == []
    # a weights member over the size limit: refused from its declared size
    big = _zip(tmp_path / "big.zip", {"adapter_config.json": cfg, "adapter_model.safetensors": bytes(3 * 1024 ** 2)})
    with pytest.raises(CheckpointError, match=r"declares 3.0 MiB, more than the 2.0 MiB limit; refused before"):
        load_checkpoint(big, base=bert_base(), max_bytes=2 * 1024 ** 2)
    assert extracted == []
    # a refused config: the weights are never extracted; a corrupt zip is refused cleanly
    bad_cfg = _zip(tmp_path / "ia3.zip", {"adapter_config.json": json.dumps(config(peft_type="IA3")).encode(),
                                          "adapter_model.safetensors": b"x" * 100})
    with pytest.raises(CheckpointError, match="is not LoRA"):
        load_checkpoint(bad_cfg, base=bert_base())
    assert extracted == ["adapter_config.json"]
    (tmp_path / "trunc.zip").write_bytes((tmp_path / "ia3.zip").read_bytes()[:-30])
    with pytest.raises(CheckpointError, match=r"not a zip file|corrupt zip"):
        load_checkpoint(tmp_path / "trunc.zip", base=bert_base())


# ------------------------------------------------------------------------------------------ peft itself


def test_the_dense_task_equals_peft_merge_and_unload(tmp_path):
    """peft's own merge (where peft is installed; it is not a dependency) gives the same weights."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from open_clip.transformer import VisionTransformer
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=D, num_hidden_layers=L, num_attention_heads=2, intermediate_size=F,
                                  vocab_size=V, max_position_embeddings=12, num_labels=3)
    vt = VisionTransformer(image_size=16, patch_size=8, width=D, layers=L, heads=2, mlp_ratio=2, output_dim=8)
    cases = [
        (transformers.BertForSequenceClassification(cfg), "", peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["query", "value", "intermediate.dense", "word_embeddings"],
            rank_pattern={"value": 2}, alpha_pattern={"intermediate.dense": 3}, use_rslora=True, task_type="SEQ_CLS")),
        (vt, "visual.", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["attn", "c_fc", "c_proj"])),
        # the Llama layout (grouped-query attention: K / V narrower than Q) with its score head, and HF ViT
        (transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
            hidden_size=D, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2, intermediate_size=F,
            vocab_size=V, num_labels=3, pad_token_id=0)), "", peft.LoraConfig(
            r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"], task_type="SEQ_CLS")),
        (transformers.ViTForImageClassification(transformers.ViTConfig(
            hidden_size=D, num_hidden_layers=L, num_attention_heads=2, intermediate_size=F, image_size=16,
            patch_size=8, num_labels=3)), "", peft.LoraConfig(
            r=2, lora_alpha=2, target_modules=["q_proj", "v_proj", "o_proj", "fc1", "fc2"], modules_to_save=["classifier"])),
    ]
    for i, (model, prefix, lcfg) in enumerate(cases):
        base = {prefix + k: v.detach().clone() for k, v in model.state_dict().items()}
        pm = peft.get_peft_model(model, lcfg)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n or "modules_to_save" in n:
                    p.normal_(0, 0.3)
        pm.save_pretrained(tmp_path / f"ad{i}")
        want = {prefix + k: v for k, v in pm.merge_and_unload().state_dict().items()}
        got = load_checkpoint(tmp_path / f"ad{i}", base=base)
        assert set(got) == set(base) and set(want) == set(base)
        changed = [k for k in base if not torch.equal(want[k], base[k])]
        assert len(changed) >= 6 and (i != 0 or "classifier.weight" in changed) and (i != 2 or "score.weight" in changed)
        for k in base:
            assert torch.allclose(got[k], want[k], atol=1e-6, rtol=0), k


# ------------------------------------------------------------------------------------------ merging


def _clip_modules():
    mods = {}
    for i in range(L):
        p = f"transformer.resblocks.{i}"
        mods.update({f"{p}.attn": (3 * D, D), f"{p}.attn.base_layer.out_proj": (D, D), f"{p}.mlp.c_fc": (2 * D, D),
                     f"{p}.mlp.c_proj": (D, 2 * D)})
    return mods


def _clip_tasks(tmp_path, r: int = 2):
    """Two rank-r LoRA tasks on a tiny open_clip tower: ``(base, {task: adapter folder}, {task: dense file})``;
    the dense files hold base + s·BA computed here, written as plain safetensors checkpoints."""
    base = clip_base()
    folders, dense = {}, {}
    for j, t in enumerate(("cars", "dtd")):
        tensors = lora_factors(_clip_modules(), r, seed=20 + j)
        folders[t] = write_adapter(tmp_path / t, config(r=r, lora_alpha=2 * r), tensors)
        sd = {k: v.clone() for k, v in base.items()}
        for m in _clip_modules():
            key = "visual." + (f"{m}.in_proj_weight" if m.endswith(".attn") else f"{m.replace('.base_layer', '')}.weight")
            A, B = tensors[f"base_model.model.{m}.lora_A.weight"], tensors[f"base_model.model.{m}.lora_B.weight"]
            sd[key] = base[key] + (B @ A) * 2.0
        dense[t] = save_safetensors(sd, tmp_path / f"{t}-dense.safetensors")
    return base, folders, dense


def _inputs(base, tasks, n: int = 64):
    from esm_core import models
    types = models.layer_types_of(base, "openclip_vit")
    g = torch.Generator().manual_seed(9)
    return {t: {k: torch.randn(n, base[k].shape[1], generator=g) for k, ty in types.items() if ty} for t in tasks}


def test_a_lora_task_merges_exactly_as_its_dense_checkpoint(tmp_path):
    from esm_core import merge_updates
    base, folders, dense = _clip_tasks(tmp_path)
    lora = {t: load_checkpoint(f, base=base) for t, f in folders.items()}
    full = {t: load_checkpoint(f, base=base) for t, f in dense.items()}
    lazy = {t: str(f) for t, f in dense.items()}                    # read key by key from the files
    inputs = _inputs(base, folders)
    for method, kw in (("ta", {"alpha": 0.3}), ("ties", {"alpha": 0.5}), ("esm", {"alpha": 1.0, "inputs": inputs})):
        a = merge_updates(method, base, lora, **kw)
        b = merge_updates(method, base, full, **kw)
        c = merge_updates(method, base, lazy, **kw) if method != "esm" else b     # ESM: seconds under load
        assert set(a) == set(b) == set(c) and len(a) >= 8, method
        for k in a:
            assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]), (method, k)


def test_esmpp_experts_of_a_rank_r_lora_task_are_exact_at_rank_r(tmp_path):
    """Where W_ESM = W0 on a routed layer (α = 0, or a layer the merge leaves alone), the residual W_t − W_ESM is
    the LoRA update s·BA itself: the rank-r expert reproduces it, rank r − 1 cannot. (Against an ESM merge at
    α > 0 the residual is full rank — ESM's update is isotropic, methods §6.5 — so no rank guarantees it.)"""
    from esm_core.esmpp.experts import build_experts
    from esm_core.merging.stats import stats_from_inputs
    r = 2
    base, folders, _ = _clip_tasks(tmp_path, r=r)
    tasks = {t: load_checkpoint(f, base=base) for t, f in folders.items()}
    stats = stats_from_inputs(_inputs(base, tasks))
    routed = [k for k in base if k.endswith(("attn.in_proj_weight", "mlp.c_fc.weight"))]
    for rank, exact in ((r, True), (r - 1, False)):
        ex = build_experts(base, tasks, stats, rank=rank, routed_keys=routed)
        for t in tasks:
            for k in routed:
                res = tasks[t][k] - base[k]
                assert torch.allclose(ex.delta(k, t), res, atol=1e-5, rtol=0) == exact, (rank, t, k)


def test_esm_studio_merge_takes_adapter_folders_and_zips(tmp_path, capsys):
    from safetensors.torch import load_file

    from esm_core import cli
    base, folders, dense = _clip_tasks(tmp_path)
    save_safetensors(base, tmp_path / "base.safetensors")
    zipped = zip_folder(folders["dtd"], tmp_path / "dtd.zip")
    runs = {"lora": [f"cars={folders['cars']}/", str(zipped)], "dense": [f"cars={dense['cars']}", f"dtd={dense['dtd']}"]}
    for kind, tasks in runs.items():
        args = ["merge", "--base", str(tmp_path / "base.safetensors"), "--method", "ta", "--set", "alpha=0.4",
                "--out", str(tmp_path / f"{kind}.safetensors"), "--json"]
        for t in tasks:
            args += ["--task", t]
        assert cli.main(args) == 0
        summary = json.loads(capsys.readouterr().out)
        assert sorted(summary["tasks"]) == ["cars", "dtd"]
    a, b = load_file(str(tmp_path / "lora.safetensors")), load_file(str(tmp_path / "dense.safetensors"))
    assert set(a) == set(b) == set(base) and all(torch.equal(a[k], b[k]) for k in a)
    k = "visual.transformer.resblocks.1.mlp.c_fc.weight"
    assert not torch.equal(a[k], base[k])
    # a BERT adapter with a classifier the base lacks: merged without it, the log says so (and names the base)
    bare = bert_base(classifier=False)
    save_safetensors(bare, tmp_path / "bert.safetensors")
    head = {"base_model.model.classifier.weight": torch.randn(3, D), "base_model.model.classifier.bias": torch.zeros(3)}
    for t in "ab":
        write_adapter(tmp_path / f"bert-{t}", config(modules_to_save=["classifier"], base_model_name_or_path="bert"),
                      {**lora_factors(bert_modules(), 4, seed=ord(t)), **head})
    assert cli.main(["merge", "--base", str(tmp_path / "bert.safetensors"), "--task", str(tmp_path / "bert-a"),
                     "--task", str(tmp_path / "bert-b"), "--method", "ta", "--out", str(tmp_path / "m.safetensors")]) == 0
    err = capsys.readouterr().err
    assert "task 'bert-a': left out of the merge (the base has no such keys): classifier." in err
    assert "bert-a: LoRA adapter, 6 module(s) of rank 4" in err and "made for base 'bert'" not in err
    assert set(load_file(str(tmp_path / "m.safetensors"))) == set(bare)


# ------------------------------------------------------------------------------------------ uploads


def _text_adapters(tmp_path, model_type: str):
    """A BERT-family base classifier (safetensors), two tasks as LoRA adapters (``colours`` zipped, ``animals`` a
    folder) with their classifiers in modules_to_save, their labelled sentences, the config and the vocabulary;
    ``dense``: each task's merged ``*ForSequenceClassification`` state dict, computed here."""
    import numpy as np
    from test_upload_text import CONFIGS, WORDS, _classifier
    base_m = _classifier(model_type, 2, 0)
    base = {k: v.detach().clone().contiguous() for k, v in base_m.state_dict().items()}
    save_safetensors(base, tmp_path / "base.safetensors")
    p = "roberta." if model_type == "roberta" else "bert."
    mods = {f"{p}encoder.layer.{i}.{m}": (48 if m == "intermediate.dense" else 32, 32) for i in range(2)    # width 32
            for m in ("attention.self.query", "attention.self.value", "intermediate.dense")}
    paths, texts, dense = {}, {}, {}
    rng = np.random.default_rng(0)
    for i, (t, C) in enumerate((("colours", 3), ("animals", 2))):
        head_m = _classifier(model_type, C, 10 + i)
        head = {f"base_model.model.{k}": v.detach().clone().contiguous() for k, v in head_m.state_dict().items()
                if k.startswith("classifier.")}
        tensors = {**lora_factors(mods, 4, seed=30 + i, scale=0.2), **head}
        folder = write_adapter(tmp_path / t, config(modules_to_save=["classifier"], base_model_name_or_path="other"),
                               tensors)
        paths[t] = zip_folder(folder, tmp_path / f"{t}.zip") if i == 0 else folder
        sd = {k: v.clone() for k, v in base.items() if not k.startswith("classifier.")}
        for m in mods:
            A, B = tensors[f"base_model.model.{m}.lora_A.weight"], tensors[f"base_model.model.{m}.lora_B.weight"]
            sd[f"{m}.weight"] = sd[f"{m}.weight"] + (B @ A) * 2.0
        dense[t] = {**sd, **{k.removeprefix("base_model.model."): v for k, v in head.items()}}
        rows = [{"text": " ".join(rng.choice(WORDS[5:], size=rng.integers(2, 8))), "label": int(j % C)}
                for j in range(16)]
        texts[t] = tmp_path / f"{t}.jsonl"
        texts[t].write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS[model_type]))
    return paths, texts, dense, dict(CONFIGS[model_type]), tmp_path / "vocab.txt"


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_a_text_upload_takes_adapter_zips_and_scores_as_the_merged_hugging_face_model(tmp_path, model_type):
    transformers = pytest.importorskip("transformers")
    from esm_core.models import bert
    from esm_core.pools.upload_text import text_pool_from_upload
    paths, texts, dense, cfg, vocab = _text_adapters(tmp_path, model_type)
    pool, notes = text_pool_from_upload(tmp_path / "base.safetensors", paths, texts, cfg, {"vocab.txt": vocab})
    assert any(n.startswith("colours.zip: LoRA adapter, 6 module(s) of rank 4") for n in notes)
    assert any(n.startswith("warning: animals was made for base 'other'") for n in notes)
    for t in pool.task_names:
        hf = transformers.AutoModelForSequenceClassification.from_config(
            bert.config_of({**cfg, "num_labels": len(pool.class_names[t])}))
        hf.load_state_dict(dense[t])
        hf.eval()
        x, _ = pool.inputs(t, "test")
        b = bert.unpack(x)
        with torch.no_grad():
            want = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            got = pool.logits(t, pool.build_model(pool.tasks[t])(x))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_an_image_upload_takes_adapter_zips_as_tasks(tmp_path):
    from fake_pool import tiny_image_zip

    from esm_core.pools.upload import pool_from_upload
    base, folders, dense = _clip_tasks(tmp_path)
    save_safetensors(base, tmp_path / "base.safetensors")
    paths = {"cars": zip_folder(folders["cars"], tmp_path / "cars.zip"), "dtd": folders["dtd"]}
    zips = {t: tiny_image_zip(tmp_path / f"{t}-images.zip", size=16) for t in paths}
    pool, notes = pool_from_upload(tmp_path / "base.safetensors", paths, zips, arch="infer", head_width=8,
                                   normalisation="clip")
    assert [n for n in notes if "LoRA adapter" in n] == [
        "cars.zip: LoRA adapter, 8 module(s) of rank 2; 0 whole tensor(s) from modules_to_save / biases",
        "dtd: LoRA adapter, 8 module(s) of rank 2; 0 whole tensor(s) from modules_to_save / biases"]
    for t in paths:
        want = load_checkpoint(dense[t], base=base)
        assert set(pool.tasks[t]) == set(base) and all(torch.equal(pool.tasks[t][k], want[k]) for k in base), t


@pytest.mark.slow
def test_the_pool_view_takes_adapter_zips_over_http(pool, tmp_path):
    """The upload form (gradio_client, the real app on a free port): BERT LoRA adapters zipped as task files load
    as a text pool; a zip that is not an adapter is refused naming what is missing."""
    import os
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    gradio_client = pytest.importorskip("gradio_client")
    from fake_pool import launch_app
    paths, texts, _, _, vocab = _text_adapters(tmp_path, "bert")
    animals = zip_folder(paths["animals"], tmp_path / "animals.zip")
    demo, url = launch_app(lambda: pool)
    try:
        c = gradio_client.Client(url, verbose=False, download_files=True)
        c.predict(api_name="/init")
        h = gradio_client.handle_file
        rest = ([h(str(texts["colours"])), h(str(texts["animals"]))], "auto",
                [h(str(tmp_path / "config.json")), h(str(vocab))], 0, "")
        c.predict(h(str(tmp_path / "base.safetensors")), [h(str(paths["colours"])), h(str(animals))], "", *rest,
                  api_name="/load_upload")
        md, table, _, _ = c.predict(api_name="/load_upload_view")
        assert "(upload)" in md and [r[0] for r in table["data"]] == ["colours", "animals"]
        assert "LoRA adapter, 6 module(s) of rank 4" in md and "made for base 'other'" in md
        _zip(tmp_path / "bad.zip", {"readme.md": b"not an adapter"})
        with pytest.raises(Exception, match="not a PEFT adapter zip — no adapter_config.json"):
            c.predict(h(str(tmp_path / "base.safetensors")), [h(str(paths["colours"])), h(str(tmp_path / "bad.zip"))],
                      "colours, animals", *rest, api_name="/load_upload")
        # an image pool: open_clip LoRA adapters zipped, beside each task's zip of class folders
        from fake_pool import tiny_image_zip
        img = tmp_path / "img"
        base, folders, _ = _clip_tasks(img)
        save_safetensors(base, img / "clip.safetensors")
        (img / "adapters").mkdir()
        (img / "images").mkdir()
        ads = [h(str(zip_folder(folders[t], img / "adapters" / f"{t}.zip"))) for t in ("cars", "dtd")]
        ims = [h(str(tiny_image_zip(img / "images" / f"{t}.zip", size=16))) for t in ("cars", "dtd")]
        c.predict(h(str(img / "clip.safetensors")), ads, "", ims, "infer", [], 8, "clip", api_name="/load_upload")
        md, table, _, _ = c.predict(api_name="/load_upload_view")
        assert [r[0] for r in table["data"]] == ["cars", "dtd"] and "cars.zip: LoRA adapter, 8 module(s)" in md
    finally:
        demo.close()


def test_hostile_configs_and_links_are_refused(tmp_path):
    ok = lora_factors(bert_modules(), 4, seed=6)
    folder = write_adapter(tmp_path / "deep", config(), ok)
    (folder / "adapter_config.json").write_text("[" * 200_000)                 # nesting the parser cannot follow
    with pytest.raises(CheckpointError, match="adapter_config.json is not valid JSON"):
        load_checkpoint(folder, base=bert_base())
    (folder / "adapter_config.json").write_text(json.dumps({**config(), "pad": "x" * adapters.MAX_ADAPTER_CONFIG_BYTES}))
    with pytest.raises(CheckpointError, match=r"adapter_config.json is 1.0 MiB, more than the 1 MiB"):
        load_checkpoint(folder, base=bert_base())
    (folder / "adapter_config.json").write_text(json.dumps(config(rank_pattern={f"p{i}": 2 for i in range(5000)})))
    with pytest.raises(CheckpointError, match=r"rank_pattern has 5,000 entries, more than 4,096"):
        load_checkpoint(folder, base=bert_base())
    link = zipfile.ZipInfo("adapter_config.json")
    link.external_attr = 0o120777 << 16                                        # a symbolic link to /etc/passwd
    with zipfile.ZipFile(tmp_path / "link.zip", "w") as z:
        z.writestr(link, "/etc/passwd")
        z.writestr("adapter_model.safetensors", b"x")
    with pytest.raises(CheckpointError, match="'adapter_config.json' is a symbolic link; refused"):
        load_checkpoint(tmp_path / "link.zip", base=bert_base())
