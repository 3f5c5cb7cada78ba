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


class _OneLineErrors:
    """Click's usage errors as one ``error: ...`` line (click prints usage, a hint and the error)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as e:
            where = e.ctx.command_path + ": " if getattr(e, "ctx", None) is not None else ""
            click.echo(f"error: {where}{e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


class Command(_OneLineErrors, click.Command):
    """A top-level click command whose usage errors are one line."""


class Group(_OneLineErrors, click.Group):
    """A click group whose usage errors (its own and its subcommands') are one line."""


def set_option(fn):
    """``--set KEY=VALUE`` (repeatable): overrides.apply_sets on the cfg before building."""
    return click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                        help="override a [net] key, or a [yolo] key on every head (net.KEY / "
                             "yolo.KEY to be explicit); checked like the cfg; repeatable")(fn)


def size_options(fn):
    fn = click.option("--height", type=click.IntRange(min=1), help="override [net] height")(fn)
    fn = click.option("--width", type=click.IntRange(min=1), help="override [net] width")(fn)
    return fn


# short aliases used by the command modules
_friendly = friendly
_size_options = size_options
