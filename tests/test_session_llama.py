"""Every view's studio call on an uploaded Llama-style decoder pool (tests/tiny_decoder.py), in process: the pool
loads into a session, Spectra / Interference / the live merge / ESM++ routing of a typed sentence / the exports run
on it with the decoder's own layer types, and a refused decoder upload leaves the previous pool and no folder."""
from __future__ import annotations

import pytest

from esm_core import studio
from esm_core.models import llama
from esm_core.studio import export as X
from esm_core.studio import inspect as I
from esm_core.studio import live as L
from esm_core.studio import routing as R
from tiny_decoder import decoder_upload


@pytest.fixture
def session(tmp_path):
    s = studio.new_session(device="cpu")
    yield s
    studio.close(s)


def _load(s, folder, model_type="llama", **over):
    base, paths, texts, config, tok = decoder_upload(folder, model_type, **over)
    return studio.load_uploaded_text(s, base, paths, texts, config=config, tokenizer_files=tok)


def test_every_view_runs_on_an_uploaded_decoder_pool(session, tmp_path):
    info = _load(session, tmp_path / "up", "qwen2")
    assert info["tasks"] and session.pool.family == llama.NAME
    assert set(I.layer_type_names(session)) <= set(llama.LAYER_TYPES)
    rows = I.spectra(session)
    assert rows and {llama.layer_type(r["key"]) for r in rows} == set(llama.ESD_TYPES)
    assert I.cosines(session)
    res = L.merge(session, "esm", {"alpha": 0.5})
    assert set(res["accs"]) == {"colours", "animals"}
    out = R.run_routing(session, rank=4, per_task=3, text="red cat is very happy")
    assert out["tasks"] == ["colours", "animals"] and len(out["layers"]) == 4     # QKV and gate/up of 2 layers
    assert out["choices"].shape == (2 * 3 + 1, 4)                                  # the typed sentence last
    path = X.export_merged(session)
    assert path.is_file() and path.suffix == ".safetensors"
    folder, _ = X.export_folder(session)                          # a transformers folder AutoModel loads
    import transformers
    assert type(transformers.AutoModel.from_pretrained(str(folder))).__name__ == "Qwen2Model"
    assert sorted(p.name for p in (folder / "heads").iterdir()) == ["animals.safetensors", "colours.safetensors"]


def test_a_refused_decoder_upload_leaves_the_previous_pool_and_no_folder(session, tmp_path):
    _load(session, tmp_path / "ok", "llama")
    before = session.pool
    with pytest.raises(ValueError, match="num_key_value_heads"):
        base, paths, texts, config, tok = decoder_upload(tmp_path / "bad", "llama")
        studio.load_uploaded_text(session, base, paths, texts, config={**config, "num_key_value_heads": 4},
                                  tokenizer_files=tok)
    assert session.pool is before
    assert len([p for p in session.workdir.glob("pool-*")]) == 1        # the loaded pool's folder only
    assert set(L.merge(session, "ta", {"alpha": 0.3})["accs"]) == {"colours", "animals"}
