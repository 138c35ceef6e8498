"""The ``dispatch-aio`` command (also ``python -m dispatch_aio``).

`main` parses the command line (`_main`); each subcommand lives in its own module:
``run`` (`_run`), the scheduler's set-up shared by ``run`` and ``server``
(`_scheduler`), ``calls``/``show``/``cancel`` (`_inspect`), ``check`` (`_check`), the
live progress display (`_progress`), and the terminal output they share (`_console`,
`_format`).
"""

from ._main import main

__all__ = ["main"]
