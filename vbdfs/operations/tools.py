"""Running the system tools vbdctl drives (losetup, tap-ctl, mount, partx)."""

from __future__ import annotations


def run_tool(args: list[str], what: str, error: type[Exception], timeout: int = 60) -> str:
    """Run args, return its stdout; raise error naming what failed and why."""
    import subprocess   # here: most vbdctl commands run no tool, and it costs ~3 ms to import
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise error(f"{what}: {args[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise error(f"{what}: {' '.join(args)} did not finish in {timeout}s") from None
    except OSError as e:
        raise error(f"{what}: {args[0]}: {e.strerror}") from None
    if r.returncode != 0:
        detail = (r.stderr or r.stdout).strip() or f"exit status {r.returncode}"
        raise error(f"{what}: {' '.join(args)} failed: {detail}")
    return r.stdout
