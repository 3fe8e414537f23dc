"""The local stack's S3 endpoint: moto's S3 server with authentication on.

    AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... python cluster/s3_server.py --host 10.213.0.2 --port 9000

Every request must be signed with the key pair of the environment the server starts in, by AWS
Signature Version 4 in its Authorization header (moto's IAM checks the signature: a wrong secret
is SignatureDoesNotMatch, an unknown key InvalidAccessKeyId). Anything else answers 403 before
moto sees it: an unsigned request, a malformed Authorization header, a presigned URL (which moto
would answer with a 500) and moto's own /moto-api/ (an unauthenticated dump and reset of its
state, keys included). Objects live in memory: they are gone when it stops.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re

os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"  # moto reads it on import: authenticate from the first request

from moto.core.models import DEFAULT_ACCOUNT_ID  # noqa: E402
from moto.iam.models import iam_backends  # noqa: E402
from moto.moto_server.werkzeug_app import (  # noqa: E402
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import make_server  # noqa: E402

ALLOW_ALL = json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]})


def add_user(access_key_id: str, secret_access_key: str, name: str = "stack") -> None:
    """An IAM user allowed everything, whose one access key is the given pair."""
    iam = iam_backends[DEFAULT_ACCOUNT_ID]["global"]
    iam.create_user("us-east-1", name)
    iam.put_user_policy(name, "stack", ALLOW_ALL)
    key = iam.create_access_key(name)  # moto draws its own pair: the stack's replaces it
    key.access_key_id, key.secret_access_key = access_key_id, secret_access_key


# What boto3, pyarrow (the AWS C++ SDK) and every S3 client send: scope date/region/s3/aws4_request.
SIGNATURE_V4 = re.compile(
    r"AWS4-HMAC-SHA256 Credential=[^/\s,]+/\d{8}/[\w-]+/s3/aws4_request, ?SignedHeaders=[a-z0-9;-]+, ?Signature=[0-9a-f]{64}"
)


def refusal(environ) -> str | None:
    """Why the endpoint refuses a request before moto sees it, or None."""
    if environ.get("PATH_INFO", "").startswith("/moto-api"):
        return "moto's API is not served"
    header = environ.get("HTTP_AUTHORIZATION")
    if header is None:
        return "requests must be signed with the stack's key (AWS Signature Version 4, Authorization header)"
    if not SIGNATURE_V4.fullmatch(header):
        return "malformed Authorization header: sign with AWS Signature Version 4 and the stack's key"
    return None


def guarded(app):
    """`app` answering 403, with the reason, to every request `refusal` names."""

    def guarded_app(environ, start_response):
        reason = refusal(environ)
        if reason:
            start_response("403 Forbidden", [("content-type", "text/plain")])
            return [f"forbidden: {reason}\n".encode()]
        return app(environ, start_response)

    return guarded_app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to bind")
    p.add_argument("--port", type=int, default=9000, help="port to bind")
    args = p.parse_args()
    try:
        key_id, secret = os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
    except KeyError as e:
        raise SystemExit(f"{e.args[0]} is not set: the server takes its key pair from the environment") from None
    add_user(key_id, secret)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no request log
    app = guarded(DomainDispatcherApplication(create_backend_app))
    server = make_server(args.host, args.port, app, threaded=True, request_handler=MotoRequestHandler)
    print(f"S3 endpoint on http://{args.host}:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
