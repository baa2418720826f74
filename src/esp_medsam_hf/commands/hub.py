"""``esp-medsam hub``: run the embedded local Hub (start/stop/status) and publish stage folders to a Hub repo."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="hub_command", required=True, metavar="ACTION")
    start = sub.add_parser("start", help="start the local Hub (olah + write server) on 127.0.0.1, print its endpoint")
    start.add_argument("--root", type=Path, required=True, help="folder for its git repositories, logs and state")
    start.add_argument("--port", type=int, default=None, help="endpoint port (default: a free one)")
    for name, text in (("stop", "stop the local Hub started for --root"), ("status", "say whether it runs")):
        action = sub.add_parser(name, help=text)
        action.add_argument("--root", type=Path, required=True, help="the folder given to `hub start`")
    publish = sub.add_parser("publish", help="publish saved model folders, one branch per training stage")
    publish.add_argument("--repo", required=True, help="repository id, namespace/name")
    publish.add_argument("--stage", action="append", required=True, metavar="BRANCH=FOLDER",
                         help="a branch (stage-1-teacher, stage-2-distill, stage-3-esp-medsam, main) and the folder "
                              "saved with save_pretrained; repeat for each stage, in order")
    publish.add_argument("--card", action="append", default=[], metavar="BRANCH=JSON",
                         help="a JSON file with that branch's model card fields (see ModelCardInfo); default: the "
                              "card.json that `esp-medsam train` wrote into the folder's run folder")
    publish.add_argument("--endpoint", default=None, help="Hub endpoint (default: HF_ENDPOINT or the Hub)")
    publish.add_argument("--private", action="store_true", help="create the repository as private")
    publish.add_argument("--attempts", type=int, default=5, help="tries per request on transient errors")


def _pairs(values: list[str], flag: str) -> dict[str, Path]:
    pairs = {}
    for value in values:
        branch, sep, path = value.partition("=")
        if not sep or not branch or not path:
            raise SystemExit(f"{flag} expects BRANCH=PATH, got {value!r}")
        pairs[branch] = Path(path)
    return pairs


def _card(branch: str, folder: Path, given: Path | None):
    """The branch's ``ModelCardInfo``: from ``--card``, else from the run's ``card.json`` (its stage's card, which
    ``main`` takes too); None without either."""
    import dataclasses

    from esp_medsam_hf.hub.cards import ModelCardInfo, find_run_card

    path = given or find_run_card(folder)
    if path is None:
        return None
    card = ModelCardInfo.from_json(path)
    return dataclasses.replace(card, stage=branch) if given is None and branch == "main" else card


def run(args: argparse.Namespace) -> int:
    from esp_medsam_hf.testing.localhub.launcher import (
        LocalHub,
        LocalHubError,
        client_env,
        is_running,
        read_state,
        read_token,
        stop_local_hub,
    )

    if args.hub_command == "start":
        try:
            hub = LocalHub(args.root, port=args.port).start()
        except LocalHubError as err:
            print(f"esp-medsam hub start: error: {err}", file=sys.stderr)
            return 1
        print(f"local hub running at {hub.endpoint} (repositories in {hub.repos_dir})")
        print("use it with (HF_TOKEN is this run's write token; every upload needs it):")
        for key, value in client_env(hub.endpoint, hub.token).items():
            print(f"  export {key}={value}")
        print(f"stop it with: esp-medsam hub stop --root {args.root}")
        return 0
    if args.hub_command == "stop":
        stopped = stop_local_hub(args.root)
        print("local hub stopped" if stopped else f"no local hub was running for {args.root}")
        return 0
    if args.hub_command == "status":
        state = read_state(args.root)
        token = read_token(args.root)
        if state and is_running(args.root) and token:
            print(json.dumps(state, indent=2))
            print("use it with:")
            for key, value in client_env(state["endpoint"], token).items():
                print(f"  export {key}={value}")
            return 0
        print(f"no local hub is running for {args.root}")
        return 1
    return _publish(args)


def _publish(args: argparse.Namespace) -> int:
    from huggingface_hub import HfApi

    from esp_medsam_hf.hub.publish import HubUnavailableError, PublishError, RetryPolicy, StageRelease, publish_model

    stages, cards = _pairs(args.stage, "--stage"), _pairs(args.card, "--card")
    unknown = sorted(set(cards) - set(stages))
    if unknown:
        raise SystemExit(f"--card given for branches that are not published: {unknown}")
    try:
        releases = [StageRelease(branch, folder, _card(branch, folder, cards.get(branch)))
                    for branch, folder in stages.items()]
        commits = publish_model(args.repo, releases, api=HfApi(endpoint=args.endpoint), private=args.private or None,
                                retry=RetryPolicy(attempts=args.attempts))
    except (ValueError, OSError, HubUnavailableError, PublishError) as err:  # OSError: HfHubHTTPError (401...)
        from . import error_message

        print(f"esp-medsam hub publish: error: {error_message(err)}", file=sys.stderr)
        return 1
    for branch, commit in commits.items():
        print(f"{args.repo}@{branch}: {commit}")
    return 0
