"""Finding the processes a test started: each carries a marker in its environment."""

from pathlib import Path

MARK = "HOSPITAL_FEDLORA_DDP_TEST"


def marked_processes(mark: str) -> list[int]:
    """Live processes whose environment carries ``mark``: everything this test's simulator started."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if f"{MARK}={mark}".encode() in (proc / "environ").read_bytes():
                state = (proc / "stat").read_text().split(")")[-1].split()[0]
                if state not in ("Z", "X"):
                    found.append(int(proc.name))
        except OSError:
            continue
    return found
