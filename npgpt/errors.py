"""npgpt's own exception: a message meant for the user, printed by the CLIs without a traceback."""


class NpgptError(Exception):
    """Something the user can fix: a bad file, flag, config or checkpoint."""


class CheckpointError(NpgptError, ValueError):
    """A checkpoint or weights file that is missing, corrupt, foreign or mismatched."""
