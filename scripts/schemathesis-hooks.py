"""Schemathesis hooks for `scripts/schemathesis`: what the run cannot do by the document alone.

Each hook changes only requests that cannot work as generated, and says why. Every check stays on.
"""

import gzip
import io
import json
import os
import tarfile
import uuid

import schemathesis
from schemathesis import GenerationMode

OWN_TOKEN = os.environ["ST_TOKEN_ID"]
OWN_TENANT = {os.environ["ST_TENANT_ID"], os.environ["ST_TENANT_NAME"]}
REGISTRY = os.environ["ST_REGISTRY"]
UPLOAD_TYPES = {
    "application/octet-stream",
    "application/x-tar",
    "application/vnd.oci.image.layout.v1+tar",
    "application/gzip",
}


def bundle() -> bytes:
    """A valid upload: a directory bundle (a tar.gz with manifest.json at its root)."""
    manifest = json.dumps({"command": ["httpd", "-f"], "port": 8080}).encode()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
    return gzip.compress(raw.getvalue(), mtime=0)


def positive(case) -> bool:
    meta = case.meta
    return meta is not None and meta.generation.mode == GenerationMode.POSITIVE


def is_stream(case) -> bool:
    path = case.operation.path
    follow = str((case.query or {}).get("follow", "")).lower() == "true"
    return path == "/v1/events" or (path == "/v1/instances/{instance}/logs" and follow)


@schemathesis.hook
def before_call(context, case, kwargs):
    path, method = case.operation.path, case.method.upper()
    # An event stream does not end: schemathesis reads one until the request timeout (10 s by default). Its opening
    # and first events come at once; two seconds of it are enough, and keep the run short.
    if is_stream(case):
        kwargs["timeout"] = 2
    # The run's own admin token and tenant must outlive it: revoking the token (whose id `GET /v1/whoami` and
    # `GET /v1/tokens` show) or deleting the tenant would answer every later request 401 and test nothing. Such
    # a request goes to an id that does not exist instead (404); every other token and tenant is fair game.
    if method == "DELETE" and path == "/v1/tokens/{id}" and case.path_parameters.get("id") == OWN_TOKEN:
        case.path_parameters["id"] = str(uuid.uuid4())
    if method == "DELETE" and path == "/v1/tenants/{tenant}" and case.path_parameters.get("tenant") in OWN_TENANT:
        case.path_parameters["tenant"] = str(uuid.uuid4())
    if method == "POST" and path == "/v1/images" and positive(case):
        if case.media_type in UPLOAD_TYPES:
            # No schema describes a valid OCI archive or bundle: bytes made from `format: binary` are rightly
            # refused as `invalid_image`. A valid upload stands in for them; refusals are tested by the negative
            # cases and the API tests.
            case.body = bundle()
        elif isinstance(case.body, dict) and isinstance(case.body.get("reference"), str):
            # The run has no network (a namespace of its own): a pull from the host the reference names would
            # fail with 502. The same repository, tag and digest are asked of the registry in the namespace.
            case.body["reference"] = local_reference(case.body["reference"])


def local_reference(reference: str) -> str:
    rest, at, digest = reference.partition("@")
    first, slash, path = rest.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        rest = path
    return f"{REGISTRY}/{rest}{at}{digest}"
