"""The "triton" backend (placeholder until its kernels land)."""


def why_not(device, auto=False):
    return "the triton backend is not implemented yet"
