"""Pallas kernels for jaxlm's hot loops. Imports jax only, never jaxlm.

The kernels arrive with the kernels issue; until then ``jaxlm.ops`` rejects impl="pallas".
"""
