"""Shared helpers of the click commands: friendly errors and the --width/--height options."""
from __future__ import annotations

import functools
import sys
import warnings

import click

from .errors import DarknetError


def friendly(fn):
    """Print library errors as one line and exit 1 (no traceback); warnings go to stderr."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        def show(message, category, filename, lineno, file=None, line=None):
            click.echo(f"warning: {message}", err=True)
        old = warnings.showwarning
        warnings.showwarning = show
        try:
            return fn(*args, **kwargs)
        except DarknetError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except OSError as e:
            click.echo(f"error: {e.filename or ''}: {e.strerror or e}", err=True)
            sys.exit(1)
        finally:
            warnings.showwarning = old
    return wrapper


def size_options(fn):
    fn = click.option("--height", type=click.IntRange(min=1), help="override [net] height")(fn)
    fn = click.option("--width", type=click.IntRange(min=1), help="override [net] width")(fn)
    return fn


# short aliases used by the command modules
_friendly = friendly
_size_options = size_options
