"""TextTaskPool: the TaskPool of a text family (the built ``text`` pool, uploaded encoders and decoders; methods §8).

It answers the same questions as :class:`esm_core.pools.taskpool.TaskPool`, so
evaluation, the probe, the α policy, ESM++, the studio and the app run on it
unchanged:

* inputs are packed token tensors (N, 2, L) — ids and attention mask
  (:func:`esm_core.models.bert.pack`); :meth:`inputs` returns them, :meth:`texts` the sentences;
* :meth:`build_model` builds the family's model, for BERT a :class:`esm_core.models.bert.TextEncoder`
  (features = mean of the last hidden state over real tokens for the built pool, the first token's for
  uploaded sequence classifiers — ``pooling``), for a Llama-style decoder a
  :class:`esm_core.models.llama.DecoderFeatures` (the last real token's, ``pooling="last"``);
* heads: linear with a bias, ``logits = f @ W.T + b`` (the built pool), or an uploaded classifier's own two
  layers (:mod:`esm_core.pools.upload_text`);
* §8: biases are each task's own. :meth:`prepare` puts task t's biases into a
  built model before t is evaluated (evaluation calls it for every task), so a
  merged state dict — which holds the base's biases — is scored as §8 says;
* the proxy set is the 32 validation sentences recorded when the pool was built.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import torch

from .. import models
from ..models import bert
from . import text_build as tb
from .taskpool import proxy_ids, subset_pool



@dataclass
class TextTaskPool:
    """Base + fine-tuned text models (a text family: ``family``) with frozen heads and labelled sentences.

    ``heads[task] = {"weight": C×d, "bias": C}``; ``data[task] = {"val": (texts, labels), "test": (texts,
    labels), "proxy_ids": ids into val}``.
    """
    name: str
    model_config: dict
    base: dict[str, torch.Tensor]
    tasks: dict[str, dict[str, torch.Tensor]]
    heads: dict[str, dict[str, torch.Tensor]]
    class_names: dict[str, list[str]]
    data: dict[str, dict]
    tokenizer: object
    max_length: int = 64
    meta: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict, repr=False)
    family: str = bert.NAME
    pooling: str = "mean"             # features: "mean" over real tokens (the built pool), "cls" (first token), "last"

    def __post_init__(self):
        for t in self.tasks:
            for what, table in (("head", self.heads), ("class names", self.class_names), ("sentences", self.data)):
                if t not in table:
                    raise ValueError(f"pool {self.name!r}: task {t!r} has no {what}")
            h = self.heads[t]
            w = h["w2"] if "w2" in h else h["weight"]
            if w.shape[0] != len(self.class_names[t]):
                raise ValueError(f"pool {self.name!r}: head of {t!r} has {w.shape[0]} rows but "
                                 f"{len(self.class_names[t])} class names")

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    @property
    def model_name(self) -> str:
        return self.meta.get("model", f"{self.model_config.get('model_type', self.family)} model")

    def _check_task(self, task: str) -> None:
        if task not in self.tasks:
            raise ValueError(f"pool {self.name!r} has no task {task!r}; tasks: {self.task_names}")

    # -- models --------------------------------------------------------------

    @property
    def family_module(self):
        """The model family (its module: the protocol of :mod:`esm_core.models.protocol`)."""
        return models.get_family(self.family)

    @property
    def modality(self) -> str:
        return self.family_module.MODALITY

    def build_model(self, state_dict: Mapping[str, torch.Tensor], device: str | torch.device = "cpu",
                    share: bool = False) -> torch.nn.Module:
        """The encoder holding ``state_dict`` (shapes checked against the pool's config first), eval mode."""
        return self.family_module.build_model(state_dict, self.model_config, device=device, share=share,
                                              pooling=self.pooling)

    def prepare(self, module: torch.nn.Module, task: str | None) -> None:
        """Before scoring ``task``: its own biases into ``module`` (a TextEncoder or a routed one; §8). ``None``
        (an input of no known task, e.g. a typed sentence): the base's, which a merged state dict holds."""
        if task is not None:
            self._check_task(task)
        inner = getattr(module, "visual", module)             # ESM++'s RoutedModel wraps the encoder
        self.family_module.load_own(inner, self.base if task is None else self.tasks[task])

    # -- data ----------------------------------------------------------------

    def texts(self, task: str, split: str = "test") -> tuple[list[str], np.ndarray]:
        self._check_task(task)
        if split not in ("val", "test"):
            raise ValueError(f"split must be 'val' or 'test', got {split!r}")
        return self.data[task][split]

    def encode(self, texts, check: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Sentences → packed (N, 2, L) inputs with the pool's tokenizer and maximum length, tokenised in chunks
        (``check(done, total)`` after each: :func:`esm_core.models.bert.encode_texts`)."""
        texts = [str(t) for t in texts]
        if not texts:
            raise ValueError("no sentences to encode")
        return bert.encode_texts(self.tokenizer, texts, self.max_length, chunk=bert.TOKENIZE_CHUNK, check=check)

    def inputs(self, task: str, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
        """(packed inputs N×2×L, labels) of one task's split; cached."""
        return self._inputs(task, split)

    def _inputs(self, task: str, split: str, check: Callable[[int, int], None] | None = None):
        key = ("inputs", task, split)
        if key not in self.cache:
            texts, y = self.texts(task, split)
            self.cache[key] = (self.encode(texts, check), torch.from_numpy(np.asarray(y, dtype=np.int64)))
        return self.cache[key]

    def tokenize_all(self, check: Callable[[str, str, int, int], None] | None = None) -> None:
        """Tokenise every task's validation and test sentences now (cached, as :meth:`inputs` does), calling
        ``check(task, split, done, total)`` after every :data:`~esm_core.models.bert.TOKENIZE_CHUNK` sentences:
        it may raise to stop (Cancel, a time bound). An uploaded pool does this while it is built, so that no
        later merge tokenises and the work stays where Cancel reaches it."""
        for t in self.task_names:
            for split in ("val", "test"):
                self._inputs(t, split, None if check is None else
                             (lambda done, total, t=t, split=split: check(t, split, done, total)))

    def proxy(self, task: str, n: int = bert.PROXY_SAMPLES, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
        """The proxy sentences of ``task`` (§8: 32 validation sentences): the ids recorded at build time when
        ``n`` and ``seed`` are the defaults, else ``n`` drawn with ``seed``."""
        x, _ = self.inputs(task, "val")
        rec = self.data[task].get("proxy_ids")
        if rec is not None and seed == 0 and n == len(rec):
            ids = [int(i) for i in rec]
        else:
            ids = proxy_ids(len(x), n, seed)
        return x[ids], ids

    def logits(self, task: str, features: torch.Tensor) -> torch.Tensor:
        """The task's frozen head: linear ``f @ W.T + b`` (``{"weight", "bias"}``; a decoder's ``score`` may have
        no bias), or an uploaded encoder classifier's two layers ``act(f @ W1.T + b1) @ W2.T + b2``
        (``{"w1", "b1", "w2", "b2", "act"}``)."""
        self._check_task(task)
        h = {k: (v.to(features.device, features.dtype) if isinstance(v, torch.Tensor) else v)
             for k, v in self.heads[task].items()}
        if "w1" in h:
            z = features @ h["w1"].T + h["b1"]
            z = torch.tanh(z) if h["act"] == "tanh" else torch.relu(z)
            return z @ h["w2"].T + h["b2"]
        out = features @ h["weight"].T
        return out + h["bias"] if "bias" in h else out

    def samples(self, task: str, k: int = 8) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """A few test sentences for display: (packed inputs, labels, the sentences)."""
        texts, y = self.texts(task, "test")
        texts, y = list(texts[:k]), np.asarray(y[:k], dtype=np.int64)
        return self.encode(texts), torch.from_numpy(y), texts

    def subset(self, tasks: list[str]) -> "TextTaskPool":
        """A pool with only ``tasks`` (same tensors, no copies)."""
        sub = subset_pool(self, tasks)
        sub.cache.update({k: v for k, v in self.cache.items()       # tokenised inputs of the kept tasks (shared)
                          if isinstance(k, tuple) and k[:1] == ("inputs",) and k[1] in tasks})
        return sub


def load_text_task_pool(path: str | os.PathLike | None = None) -> TextTaskPool:
    """The built ``text`` pool (``esm-studio build-pool text``) as a :class:`TextTaskPool`."""
    path = tb.TEXT_POOL_DIR if path is None else path
    raw = tb.load_text_pool(path)
    cfg = raw["config"]
    meta = {"model": cfg.get("model"), "source": cfg.get("model_source"), "kinds": cfg.get("kinds", {}),
            "accuracy": cfg.get("accuracy", {}), "recipe": cfg.get("recipe", {}), "path": str(path)}
    return TextTaskPool(name=cfg.get("name", "text"), model_config=raw["model_config"], base=raw["base"],
                        tasks=raw["tasks"], heads=raw["heads"], class_names=cfg["class_names"], data=raw["data"],
                        tokenizer=tb.load_tokenizer(path), max_length=int(cfg["recipe"]["max_length"]), meta=meta)
