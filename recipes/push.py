"""Push a finished run folder to the Hugging Face Hub with a generated model card.

    python recipes/push.py runs/demo/student --repo_id user/name [--private] [--revision BRANCH]
        [--message "..."] [--endpoint URL] [--teacher SOURCE]

The token comes from HF_TOKEN or the login cache (`hf auth login`).
"""

import argparse
import logging
import sys

from minidistill.hub import HubConfig, HubError, push_to_hub
from minidistill.model_card import build_model_card, run_info_from_folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="the run's saved model folder (config.json + *.safetensors)")
    parser.add_argument("--repo_id", required=True, help="user/name or org/name")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    parser.add_argument("--message", default=HubConfig.commit_message, help="commit message")
    parser.add_argument("--endpoint", default=None, help="Hub endpoint URL")
    parser.add_argument("--teacher", default=None, help="teacher source when the folder does not record it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = HubConfig(
        repo_id=args.repo_id, private=args.private, revision=args.revision,
        commit_message=args.message, endpoint=args.endpoint,
    )
    try:
        cfg.validate()
        info = run_info_from_folder(args.folder, teacher_source=args.teacher, model_name=args.repo_id)
        url = push_to_hub(args.folder, cfg, card=build_model_card(info))
    except (HubError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
