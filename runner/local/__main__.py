"""``python -m runner.local up|info|down``: the same commands as ``firetitan-track local``."""

from .cli import local

if __name__ == "__main__":
    local(prog_name="python -m runner.local")
