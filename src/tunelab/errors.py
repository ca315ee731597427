class TunelabError(Exception):
    """A problem the user can fix.

    The message is one paragraph that names the file, line, field or key at fault and says
    what to do; the command line prints it without a traceback (unless --debug) and exits 1.
    """

    exit_code = 1


class UsageError(TunelabError):
    """A command line or config that cannot run as written: an unknown command, flag or config
    key, a value of the wrong type or outside its range. The command line exits 2."""

    exit_code = 2
