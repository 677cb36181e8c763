import pytest

from esm_core.merging.registry import Method, Param, alpha_param
from esm_core.schemas import MethodSpec


def _m():
    return Method(MethodSpec("x", "X", (alpha_param(0.3, 1.0), Param("k", int, 20, "top-k %", min=1, max=100),
                                        Param("mode", str, "a", "mode", choices=("a", "b")),
                                        Param("flag", bool, False, "flag")), "test"), lambda ctx, **p: {})


def test_resolve_fills_defaults_and_coerces():
    assert _m().resolve({"alpha": "0.5", "k": "7", "flag": "yes"}) == {"alpha": 0.5, "k": 7, "mode": "a", "flag": True}


@pytest.mark.parametrize("params,msg", [({"alhpa": 1}, "no parameter"), ({"alpha": 101.0}, "<= 100.0"),
                                        ({"k": 0}, ">= 1"), ({"k": 1.5}, "type int"), ({"mode": "c"}, "one of"),
                                        ({"flag": "maybe"}, "type bool")])
def test_resolve_refuses_bad_values(params, msg):
    with pytest.raises(ValueError, match=msg):
        _m().resolve(params)


# ---------------------------------------------------------------- each default stated once (esm_core.schemas)

def test_every_method_is_its_schema_and_its_function_states_no_default():
    import inspect

    from esm_core.merging import METHODS
    from esm_core.schemas import SPECS
    assert list(METHODS) == list(SPECS)
    for name, m in METHODS.items():
        assert m.spec is SPECS[name] and m.to_dict() == SPECS[name].to_dict()
        params = list(inspect.signature(m.fn).parameters.values())[1:]
        assert [p.name for p in params] == [p.name for p in m.params], name
        assert all(p.default is inspect.Parameter.empty for p in params), name


def test_register_refuses_a_function_that_states_its_own_defaults_or_other_names():
    from esm_core.merging.registry import register
    with pytest.raises(ValueError, match="defaults belong to the schema"):
        register(Method(MethodSpec("_t1", "t", (alpha_param(0.3, 1.0),), "t"), lambda ctx, alpha=0.3: {}))
    with pytest.raises(ValueError, match=r"takes \['alpha', 'k'\], its schema declares \['alpha'\]"):
        register(Method(MethodSpec("_t2", "t", (alpha_param(0.3, 1.0),), "t"), lambda ctx, alpha, k: {}))
    from esm_core.merging import METHODS
    assert "_t1" not in METHODS and "_t2" not in METHODS


def test_a_method_is_its_spec_and_its_function():
    spec = MethodSpec("_t3", "T3", (alpha_param(0.3, 1.0),), "t3", alpha_grid=(0.0, 2.0, 5), needs_stats=True,
                      alpha_linear=True, aliases=("_t3_alias",))
    m = Method(spec, lambda ctx, alpha: {})
    assert (m.name, m.title, m.help, m.params, m.alpha_grid, m.needs_stats, m.alpha_linear, m.aliases) == (
        "_t3", "T3", "t3", spec.params, (0.0, 2.0, 5), True, True, ("_t3_alias",))
    assert m.to_dict() == spec.to_dict() and m.resolve({}) == {"alpha": 0.3}
    with pytest.raises(TypeError, match="needs a MethodSpec"):
        Method("_t3", lambda ctx, alpha: {})
    with pytest.raises(TypeError, match="fn must be callable"):
        Method(spec, None)
