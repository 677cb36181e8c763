"""The Routing view's operations: the session's ESM++ model, routing sample inputs, the decision summary."""
from __future__ import annotations

import warnings

import numpy as np
import torch
from PIL import Image

from ..device import trim_heap
from ..esmpp import ESMPP, majority_task, routing_embedding
from ..esmpp.embedding import EMBED_MIN_POINTS, _import_umap, pca_fit
from ..evaluation.alpha import UpdatesAt
from ..evaluation.esmpp import build_esmpp, wilson_interval
from ..merging import apply_updates, get_method
from ..models import short_key
from .inspect import ensure_cache, ensure_stats
from .live import _frozen, accuracies, sample_sizes
from .session import Progress, Session, _need_pool, _noop


def esmpp_model(s: Session, rank: int = ESMPP.default("rank"), progress: Progress | None = None):
    """The ESM++ routed model of the session's pool (built on first use, rebuilt when the recipe changes).

    Its static part is the session's latest ESM merge (α and parameters) — the very weights the Merge view
    evaluated, formed from that merge's cached update — or ESM with its defaults when the session has not
    merged with ESM yet.
    """
    pool = _need_pool(s)
    last = next((r for r in reversed(s.merges) if r["method"] == "esm"), None)
    params = dict(last["params"]) if last else get_method("esm").resolve({})
    alpha = float(params.pop("alpha"))
    recipe = (int(rank), alpha, _frozen(params))
    with s.lock:
        if s.esmpp is None or s.esmpp["recipe"] != recipe:
            report = progress or _noop
            stats = ensure_stats(s, progress=lambda f, d: report(0.3 * f, d))
            pair = s.affine.get(("esm", _frozen(params)))     # the session's ESM merge: its model, not a new merge
            merged = apply_updates(pool.base, UpdatesAt(*pair, alpha)) if pair is not None else None
            model = build_esmpp(pool, stats, rank=int(rank), alpha=alpha, esm_params=params, merged=merged,
                                cache=ensure_cache(s), device=s.device, check=False,     # checked when loaded
                                progress=lambda f, d: report(0.3 + 0.7 * f, d))
            # a text model's static part is that merge's very weights (U0 + α · slope, formed as the merge formed
            # them) in the same layers (a routed Q, K, V or intermediate layer in base mode is the same F.linear):
            # the merge's live accuracies are the static ("base") ones, bit for bit — not evaluated a second time
            # (a ViT's routed attention computes the same attention another way: evaluated)
            static = (dict(last["accs"]) if last is not None and pair is not None and pool.modality == "text"
                      else None)
            del merged, pair
            s.esmpp = {"recipe": recipe, "model": model, "rank": int(rank), "alpha": alpha,
                       "from_merge": last["id"] if last else None, "accs": None, "static_accs": static}
            trim_heap()
        return s.esmpp


def _image_to_input(pool, image) -> torch.Tensor:
    """An uploaded image (H×W, H×W×3 or H×W×4 uint8) → one normalised input for the pool's model."""
    arr = np.asarray(image)
    if arr.ndim not in (2, 3) or arr.size == 0:
        raise ValueError(f"the uploaded image has an unexpected shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    x_ref, _ = pool.inputs(pool.task_names[0], "val")
    size = int(x_ref.shape[-1])
    grey = pool.data[pool.task_names[0]]["val"][0].ndim == 3      # the pool's own images are grey
    im = Image.fromarray(arr).convert("L" if grey else "RGB").resize((size, size), Image.BILINEAR)
    return pool.normalise(np.asarray(im, dtype=np.uint8)[None])


@torch.inference_mode()
def _routed_accuracies(s: Session, model, progress: Progress = _noop, static: dict | None = None) -> dict:
    """Static ESM ("base"), routed and oracle accuracy on the live test subset (cached per ESM++ build).
    ``static``: the base mode's accuracies when known (the ESM merge whose weights the model holds)."""
    out = {}
    for mode in ("base", "route", "oracle"):
        if mode == "base" and static is not None and set(static) == set(s.pool.task_names):
            out[mode] = dict(static)
            continue
        out[mode] = {}
        for t in s.pool.task_names:
            progress(0.0, f"{mode} accuracy of {t}")
            with model.using(mode=mode, true_task=t):
                out[mode][t] = accuracies(s, model, "test", s.live_per_task, [t])[t]
    return out


MAX_SENTENCE_CHARS = 2000     # a typed sentence longer than this is refused (the model reads 64 tokens anyway)


def _sentence_to_input(pool, text: str) -> torch.Tensor:
    """A typed sentence → one packed input of a text pool (tokenised as the pool's own sentences)."""
    if pool.modality != "text":
        raise ValueError("this pool's model reads images: upload an image to route, not a sentence")
    text = str(text).strip()
    if len(text) > MAX_SENTENCE_CHARS:
        raise ValueError(f"the sentence has {len(text):,} characters; at most {MAX_SENTENCE_CHARS:,} are accepted")
    return pool.encode([text])


def run_routing(s: Session, rank: int = ESMPP.default("rank"), per_task: int = 6, image=None, umap: bool = False,
                progress: Progress | None = None, text: str | None = None) -> dict:
    """Route ``per_task`` samples of every task (and the uploaded ``image`` or typed ``text``, if any) through
    ESM++. ``text``: a sentence, for a text pool (its model reads sentences, not images).

    Returns ``{"tasks", "layers", "sample_labels", "true" (task index or −1), "choices" (N × L expert index),
    "cosines" (N × L × T), "layer_accuracy" (L), "routed_accuracy" / "oracle_accuracy" / "static_accuracy"
    ({task: acc} on the live test subset), "embedding", "summary_md"}``; also kept in ``s.routing``.
    The map of the samples is PCA unless ``umap`` (UMAP compiles on its first use in a process: tens of seconds).
    """
    pool = _need_pool(s)
    if not 1 <= int(per_task) <= 64:
        raise ValueError(f"samples per task must be between 1 and 64, got {per_task}")
    report = progress or _noop
    with s.lock:
        built = esmpp_model(s, rank, progress=lambda f, d: report(0.6 * f, d))
        model = built["model"]
        labels, xs = [], []
        for t in pool.task_names:
            x, y, _ = pool.samples(t, int(per_task))
            xs.append((x, t))
            labels += [f"{t} #{i} ({pool.class_names[t][int(c)]})" for i, c in enumerate(y.tolist())]
        yours = None
        if text is not None and str(text).strip():
            xs.append((_sentence_to_input(pool, text), None))
            labels.append(yours := "your sentence")
        elif image is not None:
            if pool.modality == "text":
                raise ValueError("this pool's model reads sentences: type a sentence to route, not an image")
            xs.append((_image_to_input(pool, image), None))
            labels.append(yours := "your image")
        dev = next(model.parameters()).device
        report(0.65, "routing the samples")
        prepare = getattr(pool, "prepare", None)   # text (§8): each sample with its task's own biases
        with torch.inference_mode(), model.logging(keep_inputs=True) as log:
            for x, t in xs:
                if prepare is not None:
                    prepare(model, t)
                model(x.to(dev), true_task=t)
        predicted = _read_yours(pool, model, xs[-1][0].to(dev), log) if yours is not None else None
        if built["accs"] is None:
            report(0.75, "routed vs oracle accuracy")
            trim_heap()                     # the routing pass's activations: freed pages back before 3 evaluations
            built["accs"] = _routed_accuracies(s, model, lambda f, d: report(0.75, d), built.get("static_accs"))
            trim_heap()
        accs = built["accs"]
        li = len(log.keys) - 1                      # the deepest routed layer: tasks are most separated there
        if umap:
            report(0.85, "UMAP of the samples (the first use compiles UMAP: this can take a minute)")
        method = "umap" if umap else "pca"
        if yours is None:
            emb, own_point = routing_embedding(log, li, model.experts, seed=0, method=method), None
        else:                        # the map is fitted on the pool's samples; yours is placed on it, not fitted
            emb, own_point = _embedding_with_own(log, li, model.experts, method)
        known = log.true >= 0
        T = len(log.tasks)
        n_known = int(known.sum())
        layer_acc = layer_hits = layer_ci = None
        if n_known:
            layer_hits = (log.routed[known] == log.true[known, None]).sum(0).tolist()      # per routed layer
            layer_acc = [k / n_known for k in layer_hits]
            layer_ci = [wilson_interval(k, n_known) for k in layer_hits]
        n_test = sample_sizes(s)
        acc_ci = {m: {t: wilson_interval(round(accs[m][t] * n_test[t]), n_test[t]) for t in log.tasks}
                  for m in accs}
        mean_norm = {m: float(np.mean([accs[m][t] / max(s.refs["test"]["finetuned"][t], 1e-12)
                                       for t in log.tasks])) for m in accs} if "test" in s.refs else None
        lines = [f"**ESM++** with rank-{built['rank']} experts on {len(log.keys)} routed layers, static part: ESM at "
                 f"α = {built['alpha']:.2f}" + (f" (merge #{built['from_merge']})" if built["from_merge"] else
                                                " (defaults; merge with ESM in tab 4 to change it)") + "."]
        if layer_acc is not None:
            best = int(np.argmax(layer_acc))
            lo, hi = layer_ci[best]
            lines.append(f"Routing picked the sample's own task in **{100 * float(np.mean(layer_acc)):.0f} %** of "
                         f"the decisions ({n_known} samples × {len(log.keys)} layers; chance: 1/{T} = "
                         f"{100 / T:.1f} %). Best layer: {short_key(log.keys[best])}, {layer_hits[best]} of "
                         f"{n_known} = {100 * layer_acc[best]:.0f} % (95 % interval {100 * lo:.0f}–{100 * hi:.0f} %).")
        if mean_norm:
            nt = sorted(set(n_test.values()))
            lines.append(f"Mean normalised accuracy on {nt[0] if len(nt) == 1 else f'{nt[0]}–{nt[-1]}'} test "
                         f"samples per task (n = {sum(n_test.values())} in all): static ESM "
                         f"{100 * mean_norm['base']:.1f} %, ESM++ routed {100 * mean_norm['route']:.1f} %, "
                         f"oracle routing {100 * mean_norm['oracle']:.1f} % (each task's 95 % interval: the error "
                         "bars).")
        if yours is not None:
            top, share = majority_task(log)
            task, cls = predicted
            lines.append(f"**{yours.capitalize()}** went to the **{task}** expert in "
                         f"{100 * float(share[-1]):.0f} % of the layers; read with the {task} head, ESM++ predicts "
                         f"the class **{cls}**.")
        storage = model.experts.storage()
        lines.append(f"The experts add {storage['per_task']:,} parameters per task "
                     f"({100 * (storage['share_per_task'] or 0):.1f} % of the model).")
        true_names = [n if n is not None else (yours or "your input") for n in emb["true"]]
        run = {"tasks": list(log.tasks), "layers": list(log.keys), "sample_labels": labels,
               "true": log.true.tolist(), "choices": log.chosen.numpy(), "cosines": log.cos.numpy(),
               "layer_accuracy": layer_acc, "layer_hits": layer_hits, "layer_n": n_known, "layer_interval": layer_ci,
               "chance": 1.0 / T, "routed_accuracy": accs["route"], "oracle_accuracy": accs["oracle"],
               "static_accuracy": accs["base"], "test_n": n_test, "accuracy_interval": acc_ci,
               "predicted": predicted,
               "embedding": {"points": emb["points"], "labels": true_names, "proto_points": emb["prototype_points"],
                             "method": emb["method"],
                             "proto_labels": list(emb["tasks"]),
                             "own": None if own_point is None else {
                                 "point": own_point, "label": yours,
                                 "text": f"{yours}: {predicted[0]} expert, class {predicted[1]}"},
                             "title": f"{emb['note']}, layer {short_key(str(emb['layer']))}<br><sub>★ = task "
                                      "prototypes" + (f"; ✕ = {yours}, placed on the map fitted to the samples"
                                                      if yours else "") + "</sub>"},
               "summary_md": "\n\n".join(lines), "n_tasks": T}
        report(1.0, "routing done")
        s.routing = run                             # after the last progress report: a cancel cannot stop half-way
        return run


@torch.inference_mode()
def _read_yours(pool, model, x: torch.Tensor, log) -> tuple[str, str]:
    """The task chosen for the user's input (the last sample of ``log``: the task most routed layers picked) and the
    class ESM++ predicts for it with that task's head (a text pool: with that task's own biases, §8)."""
    top, _ = majority_task(log)
    task = log.tasks[int(top[-1])]
    prepare = getattr(pool, "prepare", None)
    if prepare is not None:
        prepare(model, task)
    feats = model(x)
    cls = int(pool.logits(task, feats.float()).argmax(-1)[0])
    names = pool.class_names[task]
    return task, str(names[cls]) if 0 <= cls < len(names) else str(cls)


def _embedding_with_own(log, li: int, experts, method: str, seed: int = 0) -> tuple[dict, tuple[float, float]]:
    """The map of the pool's samples and the prototypes (all but the last sample of ``log``), fitted without the
    user's input (the last sample), which is then placed by the same fitted projection (PCA: its mean and axes;
    UMAP: ``transform``). Returns (the map, as :func:`routing_embedding` returns it: the user's point is the last
    row of its points, and that point)."""
    key = log.keys[li]
    x = log.pooled[li]
    protos = experts.prototypes[key]
    xn = torch.nn.functional.normalize(x.double(), dim=-1)
    pn = torch.nn.functional.normalize(protos.double(), dim=-1)
    z, own = torch.cat([xn[:-1], pn]), xn[-1:]
    if method == "umap" and z.shape[0] >= EMBED_MIN_POINTS:
        umap = _import_umap()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reducer = umap.UMAP(n_components=2, n_neighbors=min(15, z.shape[0] - 1), random_state=seed)
            coords = np.asarray(reducer.fit_transform(z.numpy()), dtype=np.float64)
            point = np.asarray(reducer.transform(own.numpy()), dtype=np.float64)[0]
        note = f"UMAP of L2-normalised inputs (seed {seed})"
    else:
        note = ("PCA of L2-normalised inputs" if method == "pca" else
                f"PCA: only {z.shape[0]} points (UMAP needs at least {EMBED_MIN_POINTS})")
        method = "pca"
        mean, basis = pca_fit(z)
        coords = ((z - mean) @ basis).numpy()
        point = ((own - mean) @ basis).numpy()[0]
    n = xn.shape[0] - 1
    tasks = list(log.tasks)
    true = [tasks[int(t)] if int(t) >= 0 else None for t in log.true.tolist()]
    return ({"layer": key, "method": method, "note": note, "seed": seed, "tasks": tasks,
             "points": np.vstack([coords[:n], point[None]]), "prototype_points": coords[n:], "true": true,
             "routed": [tasks[int(t)] for t in log.routed[:, li]]},
            (float(point[0]), float(point[1])))
