"""The real service of blockguardd (the default ``--service``): catalog, planner, storage.

``make_service(state_dir=..., runner=...)`` is the factory ``blockguardd`` calls. The
package is split by job: ``pools`` (registration, reopening), ``volumes`` (protect,
objectives, what clients see), ``tracking`` (trackers tied to generations), ``planning``
(gathering the planner's and scheduler's inputs), ``backups``, ``restores``, ``jobbook``
(one job per volume, mirrored in the catalog), ``scheduling`` (the loop), ``events``,
``settings`` and ``ids``; ``engine`` puts them together.
"""

from blockguard.daemon.engine.engine import Engine, make_service

__all__ = ["Engine", "make_service"]
