"""One pool per replica, so a hedged read can send attempt *i* to replica *i* (internal)."""

from __future__ import annotations

from collections.abc import Callable

from ._pool import FencedPool, Role, Router
from ._topology import Address, SentinelTopology

__all__ = ["NodePools"]

_Key = tuple[Address, Role]


class NodePools:
    """A pool per node a replica client may read from: each replica, then the master.

    The pools are made on first use, each bounded like the client's own pool. The topology
    calls :meth:`fence_changed` (as for a pool) at every change of the replica set or the
    master: the pools of nodes that left are closed, in-use connections included, and the
    others drop their connections of older generations.

    Args:
        topology: The shared discovery.
        make_pool: Makes a pool given its router and role.
        with_master: Whether the master is the last target (replica-preferred clients).
    """

    role: Role = "replica"  # the topology tells it of replica-set changes

    def __init__(
        self,
        topology: SentinelTopology,
        make_pool: Callable[[Router, Role], FencedPool],
        *,
        with_master: bool,
    ) -> None:
        self._topology = topology
        self._make = make_pool
        self._with_master = with_master
        self._pools: dict[_Key, FencedPool] = {}
        self.closed = 0

    def targets(self) -> list[FencedPool]:
        """The pools to hedge over, in order: the replicas fit for reads, then the master."""
        topology = self._topology
        pools = [self._pool(address, "replica") for address in topology.replicas]
        master = topology.master
        if self._with_master and master is not None:
            pools.append(self._pool(master, "master"))
        return pools

    def counts(self) -> dict[str, tuple[int, int]]:
        """``(idle, in use)`` connections of each node's pool, by ``host:port``."""
        return {f"{a[0]}:{a[1]}": pool.counts() for (a, _), pool in self._pools.items()}

    def _pool(self, address: Address, role: Role) -> FencedPool:
        key = (address, role)
        pool = self._pools.get(key)
        if pool is None:
            fence = self._topology.replica_fence

            async def router() -> tuple[Address, int, Role]:
                return address, fence.gen, role

            pool = self._pools[key] = self._make(router, role)
        return pool

    def _live(self) -> set[_Key]:
        topology = self._topology
        live: set[_Key] = {(address, "replica") for address in topology.replicas}
        if self._with_master and topology.master is not None:
            live.add((topology.master, "master"))
        return live

    async def fence_changed(self) -> int:
        """The replica set or the master changed: close the pools of nodes that left."""
        live = self._live()
        closed = 0
        for key, pool in list(self._pools.items()):
            if key in live:
                closed += await pool.fence_changed()
            else:
                del self._pools[key]
                idle, in_use = pool.counts()
                closed += idle + in_use
                await pool.disconnect(inuse_connections=True)
        self.closed += closed
        return closed

    async def aclose(self) -> None:
        """Close every pool and connection."""
        pools = list(self._pools.values())
        self._pools.clear()
        for pool in pools:
            await pool.disconnect(inuse_connections=True)
