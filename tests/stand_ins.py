"""Actors that stand in for engines. Their own module, not a test module nor tests/helpers.py: a Ray worker imports an
actor's class by module (it finds `tests.stand_ins`, the driver's working directory being on its path, but not a test
module's bare name), and this one imports nothing heavy, so each such actor starts in a second, not in the seconds
that torch and transformers take on 2 cores."""

from __future__ import annotations

import os
import time


class EngineStandIn:
    """A rollout actor as vLLM's NCCL sender sees it during an update: `wait` is an engine blocked in the broadcast
    (for a peer that died), `die` one whose process dies mid-update."""

    def __init__(self, behaviour: str):
        self.behaviour = behaviour

    def start_weight_update(self) -> None:
        pass

    def update_weights(self, update_info: dict) -> None:
        if self.behaviour == "die":
            time.sleep(1)
            os._exit(1)
        time.sleep(600)
