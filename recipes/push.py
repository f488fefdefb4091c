"""Push a finished run folder to the Hugging Face Hub with a generated model card.

    python recipes/push.py runs/demo/student --repo_id user/name [--private] [--revision BRANCH]
        [--message "..."] [--endpoint URL] [--teacher SOURCE]

The token comes from HF_TOKEN or the login cache (`hf auth login`).
"""

import argparse
import logging
import sys

from huggingface_hub import constants

from minidistill.errors import MinidistillError, run_cli
from minidistill.hub import HubConfig, HubError, push_to_hub, resolve_token, run_folder_files
from minidistill.model_card import build_model_card, run_info_from_folder


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="the run's saved model folder (config.json + *.safetensors)")
    parser.add_argument("--repo_id", required=True, help="user/name or org/name")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    parser.add_argument("--message", default=HubConfig.commit_message, help="commit message")
    parser.add_argument("--endpoint", default=None, help="Hub endpoint URL")
    parser.add_argument("--teacher", default=None, help="teacher source when the folder does not record it")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = HubConfig(
        repo_id=args.repo_id, private=args.private, revision=args.revision,
        commit_message=args.message, endpoint=args.endpoint,
    )
    # Cheap checks first: config, folder contents, token, offline mode.
    cfg.validate()
    run_folder_files(args.folder)
    resolve_token()
    if constants.is_offline_mode():
        raise HubError("HF_HUB_OFFLINE is set: unset it (and HF_DATASETS_OFFLINE if needed) to push to the Hub")
    try:
        info = run_info_from_folder(args.folder, teacher_source=args.teacher, model_name=args.repo_id)
        card = build_model_card(info)
    except ValueError as err:
        if isinstance(err, MinidistillError):
            raise
        raise HubError(f"{args.folder}: cannot build the model card: {err} (--teacher SOURCE names the teacher)") from err
    print(push_to_hub(args.folder, cfg, card=card))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command: a bad input prints one ``error [...]`` line and returns its exit code (see README)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
