"""One spelling per concept, in every verb, and the old spellings still accepted.

- ``--output``: the folder (or file, or prefix) a verb writes.
- ``--config``: a YAML config file, repeatable; later files override earlier ones.
- lists: a repeated flag (``--only a --only b``) or a YAML list in a dotted override
  (``data.shards.caption=[a, b]``); never ``nargs="+"`` on an option or a comma list.
- ``--json``: print one JSON object on stdout (and nothing else there).

``tests/unit/test_cli_rules.py`` walks every verb's parser and checks these rules.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any, Dict, Tuple

logger = logging.getLogger("mm1_megatron.cli")

# Every deprecated spelling, in one table: old flag -> (its replacement, the verbs that
# accepted the old one). Each keeps working, hidden from --help and logging a warning that
# names its replacement, for one release after 0.1.0; then the row and the flag go.
DEPRECATED_FLAGS: Dict[str, Tuple[str, str]] = {
    "--out": ("--output", "launch render, sweep expand, report, data (tools/*.py before)"),
    "--output-dir": ("--output", "eval"),
}


class DeprecatedFlag(argparse.Action):
    """A hidden old spelling: stores like its replacement and logs a warning naming it."""

    def __init__(self, option_strings, dest, replacement: str, **kwargs):
        kwargs["help"] = argparse.SUPPRESS
        super().__init__(option_strings, dest, **kwargs)
        self.replacement = replacement

    def __call__(self, parser, namespace, values, option_string=None):
        logger.warning(
            "%s: %s is deprecated and goes in the next release; use %s",
            parser.prog,
            option_string,
            self.replacement,
        )
        setattr(namespace, self.dest, values)


def add_deprecated(parser: argparse.ArgumentParser, old: str, **kwargs: Any) -> argparse.Action:
    """``old`` (a row of DEPRECATED_FLAGS) storing into its replacement's ``dest``."""
    replacement, _ = DEPRECATED_FLAGS[old]
    return parser.add_argument(
        old,
        dest=replacement.lstrip("-").replace("-", "_"),
        action=DeprecatedFlag,
        replacement=replacement,
        **kwargs,
    )


_OUTPUT_REQUIRED_BY = "_output_required_by"


def add_output(
    parser: argparse.ArgumentParser,
    help: str,
    *,
    required: bool = False,
    deprecated: Tuple[str, ...] = (),
    **kwargs: Any,
) -> argparse.Action:
    """``--output`` (plus the hidden old spellings this parser accepted). A required one is
    not ``required`` to argparse, which would refuse an old spelling: ``check_output``
    (after parsing) refuses a missing one instead, in this parser's name."""
    if required:
        help = f"{help} (required)"
        parser.set_defaults(**{_OUTPUT_REQUIRED_BY: parser})
    action = parser.add_argument("--output", help=help, **kwargs)
    for old in deprecated:
        add_deprecated(parser, old, type=kwargs.get("type"), metavar=action.metavar)
    return action


def check_output(args: argparse.Namespace) -> argparse.Namespace:
    """Exit 2 like argparse when a required ``--output`` was given under no spelling."""
    parser = vars(args).pop(_OUTPUT_REQUIRED_BY, None)
    if parser is not None and args.output is None:
        parser.error("the following arguments are required: --output")
    return args


def add_config(
    parser: argparse.ArgumentParser, help: str = "", *, required: bool = False
) -> argparse.Action:
    """``--config``, repeatable: the files merge left to right, later ones win."""
    stacking = "repeat to stack overlays (later files override earlier ones)"
    return parser.add_argument(
        "--config",
        action="append",
        default=[],
        required=required,
        metavar="YAML",
        help=f"{help}; {stacking}" if help else f"YAML config file; {stacking}",
    )


def add_json(parser: argparse.ArgumentParser, what: str) -> argparse.Action:
    """``--json``: ``what`` as one JSON object on stdout, instead of the text report."""
    return parser.add_argument(
        "--json", action="store_true", help=f"print {what} as one JSON object on stdout"
    )
