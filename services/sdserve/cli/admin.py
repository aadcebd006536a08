"""`sdserve admin models add|remove|list`: models added and removed while sdserve serves
(AdminService; the API key in $SDSERVE_API_KEY must have the admin role)."""

from __future__ import annotations

import argparse
import json
import sys

from sdserve.cli import options
from sdserve.cli.options import Parents


def register(sub, parents: Parents) -> None:
    admin = sub.add_parser(
        "admin",
        help="manage a running server (models added or removed without a restart)",
        description="Calls AdminService. The API key ($SDSERVE_API_KEY) must have the admin "
        "role in the server's key file (a line `KEY TENANT admin`).",
    )
    what = admin.add_subparsers(dest="admin_command", required=True, metavar="WHAT")
    models = what.add_parser("models", help="add, remove or list models")
    action = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    add = action.add_parser(
        "add",
        help="deploy a model from a folder on the server, as NAME",
        description="Deploys the model as a Serve application of its own (the other models' "
        "replicas keep serving) and returns once every ingress replica routes to it.",
        parents=[parents.server, parents.timeout(900.0)],
    )
    add.add_argument("model", metavar="NAME=DIR", help="its name and its folder on the server")
    add.add_argument(
        "--settings",
        metavar="JSON",
        default="",
        help='more of its config-file fields as a JSON object, e.g. \'{"dtype": "float32"}\'',
    )
    add.set_defaults(func=run_add)
    remove = action.add_parser(
        "remove",
        help="remove an added model once the requests it holds have ended",
        parents=[parents.server, parents.timeout(900.0)],
    )
    remove.add_argument("name", metavar="NAME")
    remove.set_defaults(func=run_remove)
    listing = action.add_parser(
        "list", help="every served model, its source and state", parents=[parents.server,
                                                                         parents.timeout(30.0)]
    )  # fmt: skip
    listing.set_defaults(func=run_list)


def run_add(args: argparse.Namespace) -> int:
    from sdserve.client import ClientError

    name, sep, path = args.model.partition("=")
    if not sep or not name or not path:
        print(f"expected NAME=DIR, got {args.model!r}", file=sys.stderr)
        return 2
    try:
        settings = json.loads(args.settings) if args.settings else {}
    except json.JSONDecodeError as exc:
        print(f"--settings is not JSON: {exc}", file=sys.stderr)
        return 2
    try:
        with options.client(args) as client:
            added = client.add_model(name, path, **settings)
    except ClientError as exc:
        return options.rpc_error(exc)
    print(f"model {added.model.name} serving (from {added.model.path}) after "
          f"{added.seconds:.1f}s; application {added.model.application}")  # fmt: skip
    return 0


def run_remove(args: argparse.Namespace) -> int:
    from sdserve.client import ClientError

    try:
        with options.client(args) as client:
            removed = client.remove_model(args.name)
    except ClientError as exc:
        return options.rpc_error(exc)
    print(f"model {args.name} removed after {removed.seconds:.1f}s "
          f"({removed.drained_requests} request(s) in flight ran to their end)")  # fmt: skip
    return 0


def run_list(args: argparse.Namespace) -> int:
    from sdserve.client import ClientError

    try:
        with options.client(args) as client:
            models = client.admin_models()
    except ClientError as exc:
        return options.rpc_error(exc)
    width = max((len(m.name) for m in models), default=4)
    for m in models:
        print(f"{m.name:<{width}}  {m.source:<6}  {m.state:<9}  {m.path or '(built-in)'}")
    return 0
