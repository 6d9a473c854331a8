"""User-facing errors: the CLI and the server turn these into one clear line (exit code 2 / an `error` reply)."""


class XSpecMeshError(Exception):
    """Base of every error whose message is meant for the user as it is."""


class MeshError(XSpecMeshError):
    """A mesh or point cloud that cannot be used: missing, unreadable, empty, NaN/inf, zero extent."""


class CheckpointError(XSpecMeshError):
    """A missing, corrupt or mismatching checkpoint."""


class SettingsError(XSpecMeshError):
    """An option out of range or of the wrong type."""
