"""DDP's processes meet within a bound of their own (trainer.rendezvous_timeout_s), or the run ends in one line.

torch waits for the processes of a process group to meet for as long as the group's timeout (30 minutes
by default, which Lightning's DDPStrategy passes for the meeting and for every collective after it), and
while a process waits for an address that resolves nowhere or a port nobody answers, torch only logs a
retry now and then, with a C++ stack trace. Here the processes meet on the TCPStore that env:// would
make (torch.distributed.TCPStore, at MASTER_ADDR:MASTER_PORT), made with the bound; the process group
then uses that store with Lightning's timeout for everything after the meeting. Neither torch nor
Lightning offers a bound on the meeting alone, hence this strategy.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import tempfile
import time
from datetime import timedelta

from lightning.fabric.utilities.distributed import _init_dist_connection
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy

from src.errors import UserError

# Lightning's local launcher starts the other processes of a machine; they wait this much longer than
# the first, so that the first gives up first, stops them and says why, once.
_STARTED_LATER_S = 10


class RendezvousTimeout(UserError):
    """The processes of a DDP run did not all meet at MASTER_ADDR:MASTER_PORT within the bound."""


class BoundedRendezvousDDP(DDPStrategy):
    """Lightning's DDPStrategy (trainer.strategy=ddp), whose processes meet within `rendezvous_timeout_s`."""

    def __init__(self, rendezvous_timeout_s: int, **kwargs):
        super().__init__(**kwargs)
        self.rendezvous_timeout_s = rendezvous_timeout_s

    def setup_distributed(self) -> None:
        # DDPStrategy.setup_distributed, with the process group's store made by meet() under the bound.
        reset_seed()
        self.set_world_ranks()
        self._process_group_backend = self._get_process_group_backend()
        environment = self.cluster_environment
        assert environment is not None
        started_by_lightning = self.local_rank > 0 and "SLURM_PROCID" not in os.environ
        try:
            store = meet(environment.main_address, environment.main_port, self.global_rank, self.world_size,
                         self.rendezvous_timeout_s, extra_s=_STARTED_LATER_S if started_by_lightning else 0)
        except RendezvousTimeout:
            self._stop_the_others()
            raise
        device_id = self.root_device if self.root_device.type != "cpu" else None
        _init_dist_connection(environment, self._process_group_backend, timeout=self._timeout, store=store,
                              device_id=device_id)

    def _stop_the_others(self) -> None:
        """The processes Lightning's launcher started on this machine: they would wait on, in vain."""
        for process in getattr(self.launcher, "procs", []):
            process.kill()
            process.wait()


def meet(address: str, port: int, rank: int, world_size: int, bound_s: int, extra_s: float = 0):
    """The TCPStore of the process group, once all `world_size` processes have reached it; RendezvousTimeout
    naming the address and port after at most about `bound_s` (+ `extra_s`) seconds."""
    import torch.distributed as dist

    started = time.monotonic()
    deadline = started + bound_s + extra_s
    while not _resolves(address):  # torch would retry an unknown name in silence, with its own timeout
        if time.monotonic() >= deadline:
            raise RendezvousTimeout(_why(address, port, world_size, bound_s, time.monotonic() - started,
                                         f"{address} resolves nowhere"))
        time.sleep(min(0.5, max(deadline - time.monotonic(), 0)))
    # The first process waits for the others the whole time left; the others' connection is retried once by
    # torch, after a pause about as long as its timeout: half the time left each.
    left = deadline - time.monotonic()
    timeout = timedelta(seconds=max(left if rank == 0 else left / 2, 1))
    with _cpp_log_held_back():
        try:
            store = dist.TCPStore(address, port, world_size, is_master=rank == 0, timeout=timeout,
                                  wait_for_workers=True, multi_tenant=True)
        except dist.DistError as error:
            joined = re.search(r"(\d+)/\d+ clients joined", str(error)) if rank == 0 else None
            seen = f"{joined.group(1)} of {world_size} processes came" if joined else \
                f"nothing answered at {address}:{port}"
            waited = time.monotonic() - started
            raise RendezvousTimeout(_why(address, port, world_size, bound_s, waited, seen)) from None
    return store


def _resolves(address: str) -> bool:
    try:
        socket.getaddrinfo(address, None)
    except OSError:
        return False
    return True


def _why(address: str, port: int, world_size: int, bound_s: int, waited: float, seen: str) -> str:
    return (f"the {world_size} DDP processes did not meet at {address}:{port} (MASTER_ADDR:MASTER_PORT) within "
            f"trainer.rendezvous_timeout_s={bound_s} (waited {waited:.0f} s): {seen}; check that the node names "
            f"resolve on every node (getent hosts {address}), that port {port} is not blocked between the nodes, "
            "and that every task started (the job's logs)")


@contextlib.contextmanager
def _cpp_log_held_back():
    """While the processes meet, what torch's C++ code logs on stderr (a retry with its stack trace) goes to a
    file instead; it is shown after all if they meet, and left unsaid if the one-line error says why not."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as log:
        os.dup2(log.fileno(), 2)
        met = False
        try:
            yield
            met = True
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            log.seek(0)
            if met and (text := log.read().decode(errors="replace")):
                sys.stderr.write(text)
