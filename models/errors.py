"""Errors raised by the model layer; each message is one line that says what to do next."""


class ModelError(Exception):
    """Base of every error of llmswarm.models that a user can act on."""


class UnknownModelError(ModelError):
    """A model name that is neither in the registry nor a local path."""


class CheckpointError(ModelError):
    """A checkpoint that is missing, unreadable, or lacks the tensors asked for."""


class CacheFullError(ModelError):
    """A session asked for more KV-cache positions than it was given."""


class DeviceError(ModelError):
    """A device or dtype this machine cannot run, or a span that does not fit its memory."""


class QuantError(ModelError):
    """A quantisation mode that is unknown, or that this machine or install cannot run."""
