import pytest

from esm_core.merging.registry import Method, Param, alpha_param


def _m():
    return Method("x", "X", lambda ctx, **p: {}, (alpha_param(0.3, 1.0), Param("k", int, 20, "top-k %", min=1, max=100),
                                                  Param("mode", str, "a", "mode", choices=("a", "b")),
                                                  Param("flag", bool, False, "flag")), "test")


def test_resolve_fills_defaults_and_coerces():
    assert _m().resolve({"alpha": "0.5", "k": "7", "flag": "yes"}) == {"alpha": 0.5, "k": 7, "mode": "a", "flag": True}


@pytest.mark.parametrize("params,msg", [({"alhpa": 1}, "no parameter"), ({"alpha": 2.0}, "<= 1.0"),
                                        ({"k": 0}, ">= 1"), ({"k": 1.5}, "type int"), ({"mode": "c"}, "one of"),
                                        ({"flag": "maybe"}, "type bool")])
def test_resolve_refuses_bad_values(params, msg):
    with pytest.raises(ValueError, match=msg):
        _m().resolve(params)
