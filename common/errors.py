"""One small family of user-facing errors. The CLIs print them as one line and exit non-zero."""


class SpineFedError(Exception):
    """A problem the user can fix; the message says what and where."""

    exit_code = 2


class ConfigError(SpineFedError):
    """A configuration file is missing, unreadable or has a bad key."""


class ManifestError(SpineFedError):
    """The manifest cannot be used at all (unreadable, a required column missing)."""


class PatientSkipped(SpineFedError):
    """One patient cannot be used; the reason is safe to show to site IT (it stays at the site)."""

    exit_code = 1


def run_command(command, args, prefix: str = "error", interrupted: str = "interrupted") -> int:
    """Run a CLI command function: a user-facing problem becomes one line on stderr and its exit code, never a
    traceback; Ctrl-C exits 130 with `interrupted`."""
    import sys

    try:
        return command(args)
    except SpineFedError as exc:
        print(f"{prefix}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
