"""What the gateway routes with: the service fills it in as things come up.

A plain record, read at each request (the service and tests replace its fields while the port
serves); no behaviour here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from entrypoint.backends import Backend
from entrypoint.fetches import FETCHES, FetchLog
from entrypoint.gateway.api import AdapterAPI
from entrypoint.gateway.bodies import BodyParser
from entrypoint.gateway.upstream import Upstream
from entrypoint.metrics import Metrics
from entrypoint.reconcile.registry import Registry, Traffic


@dataclass
class GatewayState:
    """What the gateway needs to route: filled in by the service as things come up."""

    served_name: str
    backend: Backend
    registry: Registry
    client: Upstream
    traffic: Traffic = field(default_factory=Traffic)
    #: None when the service is ready, else why not (the service decides)
    readiness: Callable[[], str | None] = lambda: "starting"
    backend_up: bool = False
    static_mode: bool = False
    metadata: dict = field(default_factory=dict)
    metrics: Metrics | None = None
    #: keys a client must send as `Authorization: Bearer <key>` (none: open)
    api_keys: tuple[str, ...] = ()
    #: the runtime adapter API (None: off)
    api: AdapterAPI | None = None
    #: reads request bodies (large ones away from the event loop)
    parser: BodyParser = field(default_factory=BodyParser)
    #: the downloads of adapter files under way (their progress shows in /v1/adapters)
    fetches: FetchLog = FETCHES
