"""meet(), in this process: DDP's processes that cannot meet end in RendezvousTimeout within the bound, with the
address, the port and what was seen (tests/test_slurm.py runs whole DDP runs that cannot meet, locally and across
two nodes)."""

from __future__ import annotations

import time

import pytest

from src.rendezvous import RendezvousTimeout, meet
from tests.conftest import free_port


def test_the_first_process_alone_is_told_how_many_came_within_the_bound():
    port = free_port()
    began = time.monotonic()
    with pytest.raises(RendezvousTimeout) as error:
        meet("127.0.0.1", port, rank=0, world_size=2, bound_s=1)
    waited = time.monotonic() - began
    assert 1 <= waited < 10, waited  # the bound, not torch's 30 minutes
    message = str(error.value)
    assert f"did not meet at 127.0.0.1:{port} (MASTER_ADDR:MASTER_PORT) within trainer.rendezvous_timeout_s=1" in message
    assert "(waited " in message and ": 1 of 2 processes came; check that" in message and "\n" not in message


def test_another_process_with_nobody_to_answer_names_the_address_within_the_bound():
    port = free_port()
    began = time.monotonic()
    with pytest.raises(RendezvousTimeout, match=rf"nothing answered at 127\.0\.0\.1:{port}; check that"):
        meet("127.0.0.1", port, rank=1, world_size=2, bound_s=2)
    assert time.monotonic() - began < 10  # about the bound: torch's retry of half the time left each
