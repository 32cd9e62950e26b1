"""Joining or starting the Ray cluster (EXECUTOR=ray) without opening the machine to anyone
who can reach it: a cluster started here listens on loopback only, with no dashboard; every
cluster, started or joined, requires Ray's token (RAY_AUTH_MODE=token, Ray 2.52 and later), kept
in a file only its owner reads; and Ray's processes never inherit the bot's secrets.
Ray is imported only inside these functions (the optional extra).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Names of environment variables that hold secrets, by the words they are made of: the bot's
# DISCORD_TOKEN, a Hub token, cloud keys and passwords. TOKENIZERS_PARALLELISM is not one (the
# word is TOKENIZERS). Ray's own variables stay: its processes need RAY_AUTH_TOKEN.
SECRET_WORDS = frozenset({"TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIALS", "KEY", "APIKEY"})

# Ray binds its servers to 127.0.0.1 alone only when the node's address is 127.0.0.1, and
# ray.init turns 127.0.0.1 into the machine's address unless Ray clusters are off (its default
# on macOS and Windows): this variable says so to the processes Ray starts, and the constant
# ray read from it when it was imported says so to this one.
CLUSTERS_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

# Run with RAY_AUTH_MODE=disabled, which sends no token: exits 0 when the cluster answers such
# a client, 3 when it refuses it for want of a token.
_STRANGER = """
import sys
from ray._raylet import GcsClient
from ray.exceptions import AuthenticationError
try:
    GcsClient(address=sys.argv[1]).internal_kv_keys(b"", None, timeout=10)
except AuthenticationError:
    sys.exit(3)
"""


class RayNotSecure(RuntimeError):
    """The Ray cluster, or this machine's side of it, would let in clients without the token."""


def secret_names(environ: Mapping[str, str]) -> list[str]:
    """The variables of `environ` that hold secrets (see SECRET_WORDS)."""
    return [
        name
        for name in environ
        if not name.startswith("RAY_") and SECRET_WORDS & set(name.upper().split("_"))
    ]


def token_path(environ: Mapping[str, str]) -> Path:
    """Where Ray reads its token from: RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token."""
    return Path(environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def private_token_file(path: Path, *, create: bool) -> Path:
    """The token file at `path`, readable by its owner alone (0600): made with a new random
    token where `create` (Ray's own would follow the umask, 0644 on most systems), tightened
    if it was readable by others; RayNotSecure where it is missing and not to be made."""
    if not path.is_file():
        if not create:
            raise RayNotSecure(
                f"no Ray token at {path}: copy the head's token there (mode 0600), or set "
                "RAY_AUTH_TOKEN_PATH to the file that holds it"
            )
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as file:
                file.write(secrets.token_hex(32))
    if path.stat().st_mode & 0o077:
        log.warning("%s was readable by other users; it is now 0600", path)
        path.chmod(0o600)
    return path


def require_token(*, create: bool) -> None:
    """Turn Ray's token authentication on for this process and the Ray processes it starts,
    with the token in RAY_AUTH_TOKEN or a private file (made here for a local cluster)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    if not os.environ.get("RAY_AUTH_TOKEN"):
        private_token_file(token_path(os.environ), create=create)
    os.environ["RAY_AUTH_MODE"] = "token"
    # Ray read its configuration when it was imported: read it again, then the token (in this
    # order, as Ray's own tests reset it).
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def answers_client(address: str, environ: Mapping[str, str]) -> bool | None:
    """Whether the cluster at `address` (host:port of its GCS) answers a client with the
    environment `environ`: False when it refused it for want of the right token, None when it
    could not be asked (unreachable, not a GCS address)."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", _STRANGER, address],
            env=dict(environ),
            capture_output=True,
            timeout=15,
        )
    except subprocess.TimeoutExpired:
        return None
    return {0: True, 3: False}.get(done.returncode)


def refuses_strangers(address: str) -> bool | None:
    """Whether the cluster at `address` refuses a client that sends no token (asked from a
    child process, since Ray's authentication mode is one per process); None: not known."""
    stranger = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    for name in secret_names(stranger):
        del stranger[name]
    answered = answers_client(address, {**stranger, "RAY_AUTH_MODE": "disabled"})
    return None if answered is None else not answered


@contextlib.contextmanager
def ray_environment(ray: Any, *, loopback: bool) -> Iterator[None]:
    """This process's environment as the Ray processes that ray.init starts should inherit it:
    without the bot's secrets and, for a local cluster, with loopback addresses. ray.init
    copies os.environ into every process it starts and takes no other environment, hence the
    swap, undone once they have started (their workers inherit from the raylet)."""
    hidden = {name: os.environ.pop(name) for name in secret_names(os.environ)}
    constants = ray._private.ray_constants
    clusters, variable = constants.ENABLE_RAY_CLUSTER, os.environ.get(CLUSTERS_SWITCH)
    if loopback:
        os.environ[CLUSTERS_SWITCH] = "0"
        constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        os.environ.update(hidden)
        constants.ENABLE_RAY_CLUSTER = clusters
        if variable is None:
            os.environ.pop(CLUSTERS_SWITCH, None)
        else:
            os.environ[CLUSTERS_SWITCH] = variable


def join_cluster(ray: Any, address: str) -> None:
    """Join the cluster at `address` with the token, once it is known not to let in clients
    without one (ShadowRay, CVE-2023-48022, is a Ray cluster that does)."""
    refuses = refuses_strangers(address)
    if refuses is False:
        raise RayNotSecure(
            f"the Ray cluster at {address} accepts clients without a token: start its head "
            "with RAY_AUTH_MODE=token and a token file (README, 'More than one GPU')"
        )
    if refuses is None:
        log.warning("could not ask the Ray cluster at %s whether it requires a token", address)
    require_token(create=False)
    with ray_environment(ray, loopback=False):
        ray.init(address=address, log_to_driver=False)


def start_local_cluster(ray: Any, cpus: int) -> None:
    """Start a Ray instance on this machine, owned by this process: loopback only, no
    dashboard, the token required."""
    require_token(create=True)
    with ray_environment(ray, loopback=True):
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)


def connect_ray(address: str | None, cpu_workers: int | None) -> Any:
    """Join the cluster at `address`, or start a local Ray instance with a core per CPU worker
    (GPUs are found by Ray itself); a Ray already initialised in this process is used as it
    is. Returns the ray module."""
    import ray

    if not ray.is_initialized():
        if address:
            join_cluster(ray, address)
        else:
            start_local_cluster(ray, max(os.cpu_count() or 1, cpu_workers or 1))
    return ray
