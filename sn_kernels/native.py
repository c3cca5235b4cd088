"""The "native" backend (placeholder until the compiled extension lands)."""


def why_not(device, auto=False):
    return "the native backend is not implemented yet"
