"""Reading traced programs in tests: the equations of a jaxpr and the kernels it calls."""

from __future__ import annotations


def equations_outside_kernels(jaxpr) -> list:
    """Every equation of a jaxpr (or ClosedJaxpr) and of its sub-jaxprs (jit, custom_vjp, scan,
    ...), without entering the bodies of Pallas kernels."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    eqns = []
    for eqn in jaxpr.eqns:
        eqns.append(eqn)
        if eqn.primitive.name == "pallas_call":
            continue
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    eqns += equations_outside_kernels(inner)
    return eqns


def pallas_call_eqns(jaxpr) -> list:
    """The pallas_call equations of a jaxpr, looking inside every sub-jaxpr."""
    return [e for e in equations_outside_kernels(jaxpr) if e.primitive.name == "pallas_call"]


def pallas_call_names(jaxpr) -> list[str]:
    """The names of the kernels a jaxpr calls, in order."""
    return [str(e.params["name"]) for e in pallas_call_eqns(jaxpr)]
