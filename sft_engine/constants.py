"""Constants shared by every stage. ``IGNORE_INDEX`` lives here and nowhere else."""

# PyTorch's cross-entropy skips targets equal to this value; every non-supervised label uses it.
IGNORE_INDEX: int = -100

ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")
