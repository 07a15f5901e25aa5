"""What validation reports: one :class:`Problem` per thing wrong with a workflow."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a workflow, tied to a node and input where it has one."""

    code: str
    message: str
    node: str | None = None
    input: str | None = None
    type: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return asdict(self)

    def __str__(self) -> str:
        where = ""
        if self.node is not None:
            where = f"node '{self.node}'" + (f" ({self.type})" if self.type else "")
            if self.input is not None:
                where += f", input '{self.input}'"
            where += ": "
        return f"[{self.code}] {where}{self.message}"


class WorkflowError(Exception):
    """A workflow that cannot run; carries every problem found."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))
