"""Connecting to Ray: an existing cluster when given its address, else one started in-process on 127.0.0.1."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from engine.errors import EngineError

LOCALHOST = "127.0.0.1"
CONNECT_TIMEOUT_S = 10.0  # an unreachable head fails within this, not after Ray's own minutes of retries


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """One line, not a hang, when a ``host:port`` (or ``ray://host:port``) cluster address does not answer."""
    match = re.fullmatch(r"(?:ray://)?\[?([^\]]+?)\]?:(\d+)", address)
    if match is None:
        return  # "auto" and other forms Ray resolves itself
    try:
        socket.create_connection((match[1], int(match[2])), timeout=timeout).close()
    except OSError as exc:
        raise EngineError(f"--address {address}: no Ray cluster answers there ({exc.strerror or exc}); start one "
                          "with `ray start --head` or leave --address out to run here") from None


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """``ray.init`` for the duration of a command, and ``ray.shutdown`` after it.

    Without ``address`` (nor ``RAY_ADDRESS``) Ray starts embedded in this
    process, bound to 127.0.0.1 and without its dashboard, so nothing listens
    on a public interface unless a cluster was deliberately started that way.
    Inside ``ray job submit`` the job's cluster is found through ``RAY_ADDRESS``.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        # Ray swaps a given 127.0.0.1 for the machine's public address, and binds its servers there,
        # unless multi-node clusters are off.  The switch is read when ray is imported (here and in the
        # processes it starts); set on the module too, it holds where ray was imported earlier.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray._private import ray_constants

    if not address:
        ray_constants.ENABLE_RAY_CLUSTER = False

    if ray.is_initialized():  # already connected (a test, or a notebook): leave the session to its owner
        yield
        return
    if address:
        check_reachable(address)
        ray.init(address=address, log_to_driver=False)
    else:  # "local": always a private Ray, never some other one that happens to run on this machine
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 _node_ip_address=LOCALHOST, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
