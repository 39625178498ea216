"""`python -m raypo ...`: the same as the `raypo` command."""

from raypo.cli import app

app(prog_name="raypo")
