"""Put the cluster's secrets on this node from AWS SSM Parameter Store (SecureString parameters,
read with the node's instance profile), before `ray start`:

    python cluster/node_secrets.py                  # /ray-diffusion/* -> ~/.ray/auth_token, ~/.ray-diffusion.env
    set -a && . ~/.ray-diffusion.env && set +a && ray start ...

<prefix>/ray-token becomes the Ray token file (0600), read through RAY_AUTH_TOKEN_PATH; the other
parameters (<prefix>/MLFLOW_TRACKING_USERNAME, .../MLFLOW_TRACKING_PASSWORD,
.../RAY_DIFFUSION_API_KEY) become the export lines of the env file (0600), which the Ray node and
so every job on it inherit. No value is printed or passed on a command line.
"""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

TOKEN = "ray-token"


def write_private(path: Path, text: str) -> None:
    """`text` in a file only its owner reads (0600 from the start), replaced atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(text)
    tmp.replace(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prefix", default="/ray-diffusion", help="SSM parameter path holding the secrets")
    p.add_argument("--token-file", default="~/.ray/auth_token", help="where the Ray token goes")
    p.add_argument("--env-file", default="~/.ray-diffusion.env", help="where the other secrets go, as export lines")
    args = p.parse_args(argv)
    import boto3

    ssm = boto3.client("ssm")
    values = {}
    for page in ssm.get_paginator("get_parameters_by_path").paginate(Path=args.prefix, WithDecryption=True):
        values |= {param["Name"].rsplit("/", 1)[1]: param["Value"] for param in page["Parameters"]}
    if TOKEN not in values:
        raise SystemExit(
            f"no {args.prefix}/{TOKEN} in SSM Parameter Store: create it (cluster/README.md) and let the node's "
            "instance profile read it (ssm:GetParametersByPath, kms:Decrypt)"
        )
    token_file = Path(args.token_file).expanduser()
    write_private(token_file, values.pop(TOKEN))
    exports = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file), **values}
    write_private(
        Path(args.env_file).expanduser(), "".join(f"export {k}={shlex.quote(v)}\n" for k, v in exports.items())
    )
    print(f"Ray token in {token_file}; {', '.join(exports)} in {args.env_file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
