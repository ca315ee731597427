class TunelabError(Exception):
    """A problem the user can fix.

    The message is one paragraph that names the file, line, field or key at fault and says
    what to do; the command line prints it without a traceback (unless --debug).
    """
