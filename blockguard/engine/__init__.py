"""The application layer: the only place core and storage meet; it imports no D-Bus.

``engine.make_service(state_dir=..., runner=...)`` is the factory ``blockguardd`` calls;
``service`` is the interface the D-Bus adapters see and ``jobs`` the job runner. The
package is split by job: ``pools`` (registration, reopening), ``volumes`` (protect,
objectives, what clients see), ``tracking`` (trackers tied to generations), ``planning``
(gathering the planner's and scheduler's inputs), ``backups``, ``restores``, ``jobbook``
(one job per volume, mirrored in the catalog), ``scheduling`` (the loop), ``events``,
``settings`` and ``ids``; ``engine`` puts them together.
"""
