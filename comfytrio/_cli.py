"""Command line (in progress)."""

def main() -> None:
    """Entry point."""
