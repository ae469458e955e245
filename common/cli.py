"""The one subcommand pattern of the console scripts (`client`, `server`, `simulate`).

A subcommand is a `Command`: its name, help line, a function that adds its arguments and the function that runs it.
Options every subcommand shares (`--config`, `-v`) are declared once and accepted before or after the subcommand's
name: `client --config site.yaml prepare` and `client prepare --config site.yaml` are the same command.

Why the shared options are declared twice by argparse: the top-level parser holds the real default; each subparser
gets a copy whose default is SUPPRESS, because argparse copies every subparser attribute over the top-level one and
an unsuppressed default would erase a value given before the subcommand. A shared option that a subcommand cannot do
without is checked after parsing (`Command.requires`), with argparse's own message and exit code 2.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str | None = None  # default: the help line
    requires: tuple[str, ...] = ()  # shared options this subcommand needs, as spelled on the command line


class CommandLine:
    """A console script: a parser with the shared options and one subparser per `Command`.

    `shared` adds the options every subcommand takes; `top` those of the script alone (`client --site`);
    `required`: whether a subcommand must be given (`simulate`) or the script has its own action (`server`)."""

    def __init__(
        self,
        prog: str,
        commands: Sequence[Command],
        shared: Callable[[argparse.ArgumentParser], None] | None = None,
        *,
        top: Callable[[argparse.ArgumentParser], None] | None = None,
        required: bool = False,
        **parser_kwargs,
    ):
        self.parser = argparse.ArgumentParser(prog=prog, **parser_kwargs)
        self.commands = {c.name: c for c in commands}
        if top is not None:
            top(self.parser)
        parents = []
        if shared is not None:
            shared(self.parser)
            parent = argparse.ArgumentParser(add_help=False)
            shared(parent)
            for action in parent._actions:
                action.default = argparse.SUPPRESS
            parents = [parent]
        sub = self.parser.add_subparsers(dest="command", metavar="COMMAND", required=required)
        self._subparsers = {}
        for c in commands:
            p = sub.add_parser(c.name, help=c.help, description=c.description or c.help, parents=parents)
            c.arguments(p)
            self._subparsers[c.name] = p

    def parse(self, argv: Sequence[str] | None = None) -> argparse.Namespace:
        """Parse like argparse; a subcommand missing a shared option it requires exits 2 with argparse's message."""
        args = self.parser.parse_args(argv)
        command = self.commands.get(args.command)
        if command is not None:
            missing = [opt for opt in command.requires if getattr(args, _dest(opt), None) is None]
            if missing:
                self._subparsers[command.name].error(f"the following arguments are required: {', '.join(missing)}")
        return args

    def run_of(self, args: argparse.Namespace) -> Callable[[argparse.Namespace], int] | None:
        """The function that runs the parsed subcommand; None when none was given."""
        command = self.commands.get(args.command)
        return command.run if command is not None else None


def _dest(option: str) -> str:
    return option.lstrip("-").replace("-", "_")
