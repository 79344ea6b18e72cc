"""What every command's --help shares: each option's default, shown only where there is one to show."""
from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """ArgumentDefaultsHelpFormatter without "(default: None)" for flags, lists and options whose help says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, [], "", argparse.SUPPRESS) or "default:" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)
