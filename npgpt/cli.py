"""What the command-line scripts share: one clear line on a user error, no traceback."""
import sys

from .errors import NpgptError


def run_cli(main, argv=None):
    """Run main(argv); print `error: ...` and exit non-zero for a user error (bad
    file, flag, config, checkpoint), 130 on Ctrl-C."""
    try:
        return main(argv)
    except (NpgptError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except MemoryError:
        print("error: out of memory; use a smaller --batch-size, --block-size or model",
              file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
