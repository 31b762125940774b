"""The one exception type users see: a clear, one-line message (file, row, field)."""


class VlpError(Exception):
    """A user-facing error.  The CLI prints ``error: <message>`` and exits 2, no traceback
    (set ``VLP_TRACEBACK=1`` or pass ``--traceback`` to see one)."""


class ModelError(VlpError, ValueError):
    """A model folder, architecture or family that cannot be used (``vlp_core.models``)."""
