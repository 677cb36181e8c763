"""A toy model family written against esm_core/models/protocol.py only: a stack of linear layers on token
sequences (``blocks.<i>.fc``), features = the mean over tokens. tests/test_family_plugin.py registers it (one
line) and runs the probe, ESM++'s surgery and an ESM++ file's rebuild on it, with no other code changed."""
from __future__ import annotations

import re

import torch

from esm_core.models.protocol import RecordPoint
from esm_core.models.roles import MATRIX, SKIP, VECTOR

NAME = "toy"
DESCRIPTION = "toy token MLP (tests only)"
MODALITY = "image"
FC = "fc"
LAYER_TYPES = ESD_TYPES = ROUTED_TYPES = PROBED_TYPES = (FC,)
ALPHA_ON_ALL = False
_KEY = re.compile(r"^blocks\.(\d+)\.fc\.weight$")


def matches(keys) -> bool:
    return any(_KEY.match(k) for k in keys)


def roles_of(sd):
    return {k: SKIP if not v.is_floating_point() else MATRIX if v.ndim == 2 else VECTOR for k, v in sd.items()}


def layer_type(key):
    return FC if _KEY.match(key) else None


def layer_types_of(keys):
    return {k: FC for k in keys if _KEY.match(k)}


def block_index(key):
    m = _KEY.match(key)
    return int(m.group(1)) if m else None


def esd_keys(keys, types=ESD_TYPES):
    return [k for k in keys if layer_type(k) in types]


def short_key(key):
    return f"{block_index(key)} · fc" if layer_type(key) else key


def input_group(key):
    return key


def routing_groups(keys):
    bad = [k for k in keys if layer_type(k) is None]
    if bad:
        raise ValueError(f"cannot route {bad[0]!r}")
    return [(k, [k]) for k in sorted(keys, key=block_index)]


def module_key(key):
    return key


def convert(sd, name="checkpoint"):
    return dict(sd)


class Toy(torch.nn.Module):
    def __init__(self, d: int, n: int):
        super().__init__()
        self.d, self.n = d, n
        self.blocks = torch.nn.ModuleList(torch.nn.ModuleDict({"fc": torch.nn.Linear(d, d)}) for _ in range(n))

    def forward(self, x):                                   # x: (B, T, d)
        for blk in self.blocks:
            x = x + torch.tanh(blk["fc"](x))
        return x.mean(1)


def build_model(sd, config, *, device="cpu", share=False):
    with torch.device("meta"):
        m = Toy(int(config["d"]), int(config["n"]))
    want = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    if want != got:
        raise ValueError(f"state dict does not fit the toy config: {sorted(set(want.items()) ^ set(got.items()))[:3]}")
    m.load_state_dict({k: v.clone() for k, v in sd.items()}, assign=True)
    return m.to(device).eval()


def is_model(module):
    return isinstance(module, Toy)


def model_keys(module):
    return list(module.state_dict())


def load_state(module, sd):
    module.load_state_dict(dict(sd))


def load_own(module, task_sd):
    pass


def saved_config(module):
    return {"model_config": {"d": module.d, "n": module.n}}


def rebuild(sd, config):
    return build_model(sd, config["model_config"])


def sample_mask(x):
    return None


def record_points(module, keys):
    return [RecordPoint(k, module.blocks[block_index(k)]["fc"], "input", True) for k in keys]


def route(module, key, make):
    old = module.blocks[block_index(key)]["fc"]
    module.blocks[block_index(key)]["fc"] = make(old.weight, old.bias, True)
