"""The one error of the contract, shared by every reader and writer."""


class ArtifactError(RuntimeError):
    """The artifact is missing, unreadable, tampered with, of a newer format, or does not satisfy the schema."""
