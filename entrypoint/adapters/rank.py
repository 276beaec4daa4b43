"""The rank limit: the largest adapter rank this server accepts, and how to raise it.

Plain data; knows nothing of folders beyond an AdapterFolder's rank."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from entrypoint.adapters.folder import AdapterFolder


@dataclass(frozen=True)
class RankLimit:
    """The largest adapter rank a server accepts, and where that number came from.

    Computed once at start (`launch.rank_limit`) and used by every check: the start-up scan,
    the watcher's scans and `check-adapters`. Its messages name NIM_MAX_LORA_RANK only when the
    user set it.
    """

    value: int
    derived: bool = False  # False: NIM_MAX_LORA_RANK set it
    engine: str = ""  # the backend whose largest rank bounds a derived limit
    engine_max: int = 0
    allowed: tuple[int, ...] = ()  # the limits the engine accepts (empty: any)

    def problem(self, rank: int) -> str | None:
        """None when an adapter of `rank` is accepted; otherwise why not and what to do."""
        if rank <= self.value:
            return None
        if not self.derived:
            return (f"rank {rank} is above NIM_MAX_LORA_RANK={self.value}; raise "
                    "NIM_MAX_LORA_RANK or use a smaller adapter")
        if rank > self.engine_max:
            return (f"rank {rank} is above the largest rank {self.engine} allows "
                    f"({self.engine_max}); use an adapter of rank {self.engine_max} or less")
        return (f"rank {rank} is above this server's rank limit {self.value}, derived at start "
                "from the adapters present then; restart the server to serve it")

    def engine_rank(self, rank: int) -> int:
        """The smallest rank limit the engine allows that covers `rank`."""
        allowed = [r for r in self.allowed if r >= rank]
        return allowed[0] if allowed else rank

    def apply(self, folder: AdapterFolder) -> AdapterFolder:
        """`folder`, marked invalid when its rank is above the limit."""
        problem = self.problem(folder.rank) if folder.valid and folder.rank else None
        return folder if problem is None else replace(folder, problem=problem)

    def describe(self) -> str:
        if not self.derived:
            return f"{self.value} (NIM_MAX_LORA_RANK)"
        return (f"{self.value} (derived from the adapters found at start; {self.engine} "
                f"allows up to {self.engine_max})")


