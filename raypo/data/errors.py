"""The one error type of `raypo.data`: bad data, said where it is."""

from __future__ import annotations

from raypo.errors import RaypoError


class DataError(RaypoError, ValueError):
    """A preference dataset that cannot be used as it is.

    The message names the file (or hub dataset), the column and the 0-based row, and says what
    was expected, so the user can open the file and fix that row without reading our code.
    """

    @classmethod
    def at(cls, source: object, column: str | None, row: int | None, what: str) -> DataError:
        """`{source}: column 'chosen', row 3: {what}` (column and row left out when unknown)."""
        where = [str(source)]
        if column is not None:
            where.append(f"column {column!r}")
        if row is not None:
            where.append(f"row {row}")
        return cls(f"{', '.join(where)}: {what}")
