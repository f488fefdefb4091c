"""Push a finished run folder to the Hugging Face Hub with a generated model card.

    python recipes/push.py runs/demo/student --repo_id user/name [--private] [--revision BRANCH]
        [--message "..."] [--endpoint URL] [--teacher SOURCE]

The same command as ``minidistill push`` (:mod:`minidistill.cli`). The token comes from HF_TOKEN or
the login cache (`hf auth login`).
"""

import sys

from minidistill.cli import command


def main(argv: list[str] | None = None) -> int:
    """The command: a bad input prints one ``error [...]`` line and returns its exit code (see README)."""
    return command("push", argv)


if __name__ == "__main__":
    sys.exit(main())
