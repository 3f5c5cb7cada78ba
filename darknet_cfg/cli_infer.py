"""Click commands for infering (registered on the darknet-cfg group by cli.py)."""
import click


def register(group: click.Group) -> None:
    """Add this module's commands to group."""
