"""Errors a user can act on. Their messages are shown as they are, with the failing node named."""


class NodeError(Exception):
    """A failure caused by the input (a file, a value, a model), not by a bug."""


class LoRAError(NodeError):
    """A LoRA file that cannot be read, or that does not fit the model it is applied to."""


class ModelLoadError(NodeError):
    """A base model that cannot be loaded; the message says what is missing and what to pass."""
