"""Merging methods on the built ``text`` pool (SPEC §8): a quick results table, CPU-sized.

For each method the task updates are computed once at α = 1 and scaled by α
on **every** merged key (§8; TA / TIES / TSV-M are linear in α anyway, ESM
applies α to its ESD keys only, so α = 1 then × α gives §8's rule). Biases and
heads are each task's own (``bert.with_own``); ESD runs on all six linear
types with inputs recorded inside each fine-tuned model on its 32 proxy
validation sentences, padding tokens excluded. α is chosen by the best mean
normalised accuracy on (a subset of) validation — a short grid per method,
extended past an end while the best α sits on it (the α policy,
:func:`esm_core.evaluation.alpha.extend_curve`); the table reports test
accuracy at that α.

``python -m esm_core.evaluation.text_runs [pool_dir] --alphas 0.3,0.6,1.0 --n-val 100``
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ..merging import apply_updates, merge_updates
from ..merging.stats import stats_from_inputs
from ..models import bert
from ..pools import text_build as tb
from . import alpha as A

DEFAULT_ALPHAS = {"ta": (0.2, 0.3, 0.5), "ties": (0.5, 0.8, 1.0), "tsv_m": (0.5, 0.8, 1.0), "esm": (0.3, 0.6, 1.0)}


@torch.no_grad()
def proxy_stats(pool: dict, model, tok, keys, max_length: int) -> dict:
    """Activation statistics for ESM (``stats=``): per task and ESD key, the Gram matrix of the key's input
    inside fine-tuned model t on t's proxy sentences, padding tokens excluded. Q, K and V of a layer read
    the same input, so they share one entry (recorded once)."""
    groups = {k: bert.input_group(k) for k in keys}
    heads_of_groups = sorted(set(groups.values()), key=list(keys).index)
    out = {}
    for t, sd in pool["tasks"].items():
        bert.load_state(model, sd)
        texts = [pool["data"][t]["val"][0][i] for i in pool["data"][t]["proxy_ids"]]
        X = bert.layer_inputs(model, bert.tokenize(tok, texts, max_length), heads_of_groups)
        st = stats_from_inputs({t: X})["tasks"][t]
        out[t] = {k: st[g] for k, g in groups.items()}
    return {"tasks": out}


def evaluate(model, tok, pool: dict, merged: dict, roles: dict, split: str, n: int | None, max_length: int
             ) -> dict[str, float]:
    """Per-task accuracy of a merged state dict, each task with its own biases and head (§8)."""
    acc = {}
    for t in pool["tasks"]:
        bert.load_state(model, bert.with_own(merged, pool["tasks"][t], roles))
        texts, labels = pool["data"][t][split]
        if n is not None and n < len(texts):
            ids = np.random.default_rng(0).choice(len(texts), n, replace=False)
            texts, labels = [texts[i] for i in ids], labels[ids]
        acc[t] = tb.accuracy(model, pool["heads"][t], tok, texts, labels, max_length)
    return acc


def run(pool_dir=tb.TEXT_POOL_DIR, methods=("ta", "ties", "tsv_m", "esm"), alphas: dict | None = None,
        n_val: int | None = 100, n_test: int | None = None, log=print) -> dict:
    t0 = time.time()
    pool = tb.load_text_pool(pool_dir)
    cfg = pool["config"]
    ml = cfg["recipe"]["max_length"]
    tok = tb.load_tokenizer(pool_dir)
    base, tasks = pool["base"], pool["tasks"]
    roles = bert.roles_of(base)
    ek = bert.esd_keys(base)
    model = bert.build(base, pool["model_config"])
    alphas = {**DEFAULT_ALPHAS, **(alphas or {})}
    stats = proxy_stats(pool, model, tok, ek, ml) if "esm" in methods else None
    log(f"proxy statistics ready ({time.time() - t0:.0f} s)")
    ft = {t: cfg["accuracy"][t]["finetuned_test"] for t in pool["tasks"]}
    results = {"zero-shot": {"test": {t: cfg["accuracy"][t]["zeroshot_test"] for t in tasks}},
               "fine-tuned": {"test": ft}}
    ft_val = {t: cfg["accuracy"][t]["finetuned_val"] for t in pool["tasks"]}
    for m in methods:
        kw = {"stats": stats} if m == "esm" else {}
        # the BERT family is found from the key names: §8's roles, ESD on the six types, α on every key
        ups = merge_updates(m, base, tasks, alpha=1.0, **kw)
        val = {}

        def score(a: float, m=m, ups=ups, val=val) -> float:
            merged = apply_updates(base, bert.scale_updates(ups, a))
            val[a] = evaluate(model, tok, pool, merged, roles, "val", n_val, ml)
            s = float(np.mean([val[a][t] / ft_val[t] for t in val[a]]))
            log(f"{m} α={a:g}: val {100 * np.mean(list(val[a].values())):.1f} (norm {100 * s:.1f})  "
                f"({time.time() - t0:.0f} s)")
            return s

        curve = [(a, score(a)) for a in alphas[m]]
        a_param = A.alpha_param(m)                   # the α policy: extend while the best α is at an end
        A.extend_curve(curve, score, a_param.min, a_param.max, max_extra=3)
        best = max(curve, key=lambda e: (e[1], -e[0]))[0]
        merged = apply_updates(base, bert.scale_updates(ups, best))
        test = evaluate(model, tok, pool, merged, roles, "test", n_test, ml)
        results[m] = {"alpha": best, "val_mean": {f"{a:g}": float(np.mean(list(v.values()))) for a, v in val.items()},
                      "test": test}
        log(f"{m}: α={best} test {100 * np.mean(list(test.values())):.1f}  ({time.time() - t0:.0f} s)")
    results["_meta"] = {"seconds": round(time.time() - t0, 1), "n_val": n_val, "n_test": n_test,
                        "alpha_on_every_key": True, "esd_keys": len(ek)}
    return results


def table(results: dict, tasks: list[str]) -> str:
    ft = results["fine-tuned"]["test"]
    head = f"| method | α | {' | '.join(tasks)} | mean | norm. |"
    lines = [head, "|" + "---|" * (len(tasks) + 4)]
    for m, r in results.items():
        if m.startswith("_"):
            continue
        accs = [r["test"][t] for t in tasks]
        norm = np.mean([r["test"][t] / ft[t] for t in tasks])
        lines.append(f"| {m} | {r.get('alpha', ''):{'g' if 'alpha' in r else ''}} | " + " | ".join(f"{100 * a:.1f}" for a in accs)
                     + f" | {100 * np.mean(accs):.1f} | {100 * norm:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="merging methods on the text pool (α on validation, test table)")
    ap.add_argument("pool", nargs="?", default=str(tb.TEXT_POOL_DIR))
    ap.add_argument("--methods", default="ta,ties,tsv_m,esm")
    ap.add_argument("--n-val", type=int, default=100)
    ap.add_argument("--n-test", type=int, default=0, help="0 = the whole test split")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)
    res = run(a.pool, methods=a.methods.split(","), n_val=a.n_val or None, n_test=a.n_test or None)
    tasks = list(res["fine-tuned"]["test"])
    print(table(res, tasks))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
