"""The backends, one module each, every one exporting a ``backend`` object of the type
``contract.Backend`` (and ``why_not(device, auto=False)``, which can be asked before the
backend loads).  ``sn_kernels.dispatch`` is the only place that chooses among them.

Adding a backend (see README.md, "Architecture"):

1. write ``sn_kernels/backends/<name>.py`` with ``why_not`` and kernels for the two
   functions of the contract (power iteration, W / sigma) and the backward;
2. register them with ``contract.define_ops`` (Python) or ``contract.register_ops``
   (ops defined in C++), and build ``backend = Backend(...)``;
3. add ``<name>`` to ``MODULES`` below, in speed order; the contract suite
   (tests/test_contract.py) then runs over it on every device where it can run.
"""
from __future__ import annotations

#: backend name -> module, fastest first ("auto" takes the first that can run)
MODULES = {
    "native": "sn_kernels.backends.native",
    "triton": "sn_kernels.backends.triton",
    "torch": "sn_kernels.backends.pytorch",
}
NAMES = tuple(MODULES)
