"""Errors raised by the model layer; each message is one line that says what to do next."""


class ModelError(Exception):
    """Base of every error of llmswarm.models that a user can act on."""


class UnknownModelError(ModelError):
    """A model name that is neither in the registry nor a local path."""


class CheckpointError(ModelError):
    """A checkpoint that is missing, unreadable, or lacks the tensors asked for."""


class CacheError(ModelError):
    """A step its KV cache cannot take (one of the three below)."""


class CacheFullError(CacheError):
    """No room now: the pool of pages is exhausted (another server, or later, may have room)."""


class SessionFullError(CacheError):
    """The step would pass the session's own max length."""


class CachePositionError(CacheError):
    """A step at a position past the tokens the cache holds (a gap): the caller's bug."""


class LengthError(ModelError):
    """A prompt or session longer than the length asked for (--max-length) or allowed."""


class DeviceError(ModelError):
    """A device or dtype this machine cannot run, or a span that does not fit its memory."""


class QuantError(ModelError):
    """A quantisation mode that is unknown, or that this machine or install cannot run."""
