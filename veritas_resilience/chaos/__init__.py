"""Chaos engineering: faults injected in-process and on the wire.

- **Injectors** (:class:`FaultInjector`, :class:`LatencyInjector`, :class:`OutcomeInjector`,
  :class:`BehaviourInjector`): make a chosen share of calls fail, slow down, return a fake
  answer or run a side effect; as decorators or as the innermost step of a
  :class:`~veritas_resilience.Pipeline` (``chaos=[...]``). Seeded random sources make runs
  reproducible; each injection is a :class:`ChaosInjected` event.
- **A TCP fault proxy** (:class:`ProxyServer`) with Toxiproxy's toxics (:class:`Toxic`: latency
  with jitter, bandwidth, slow_close, timeout, reset_peer, slicer, limit_data; toxicity; either
  direction) and Toxiproxy's HTTP API, so Toxiproxy clients drive it. ``veritas-resilience
  proxy`` runs it. The testing kit's :class:`~veritas_resilience.testing.FaultProxy` is the same
  engine with runtime faults for tests.
"""

from __future__ import annotations

from ._errors import ChaosError as ChaosError
from ._errors import InjectedFaultError as InjectedFaultError
from ._errors import ProxyError as ProxyError
from ._inject import BehaviourInjector as BehaviourInjector
from ._inject import ChaosInjected as ChaosInjected
from ._inject import FaultInjector as FaultInjector
from ._inject import Injector as Injector
from ._inject import LatencyInjector as LatencyInjector
from ._inject import OutcomeInjector as OutcomeInjector
from ._proxy import TOXIC_TYPES as TOXIC_TYPES
from ._proxy import Toxic as Toxic
from ._server import ProxyInfo as ProxyInfo
from ._server import ProxyServer as ProxyServer

__all__ = [
    "BehaviourInjector",
    "ChaosError",
    "ChaosInjected",
    "FaultInjector",
    "InjectedFaultError",
    "Injector",
    "LatencyInjector",
    "OutcomeInjector",
    "ProxyError",
    "ProxyInfo",
    "ProxyServer",
    "TOXIC_TYPES",
    "Toxic",
]
