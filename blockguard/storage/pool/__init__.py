"""Pools of backup space: the backend interface (:mod:`.base`, whose ``__all__`` lists it)
and its backends, ``dir`` (:mod:`.dirpool`, XFS reflink) and ``lvm`` (:mod:`.lvmpool`).

Importers name the module they use (``from blockguard.storage.pool.base import
PoolBackend``): the interface is listed once, in :mod:`.base`, not again here.
"""
