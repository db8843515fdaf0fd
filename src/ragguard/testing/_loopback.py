"""The one rule every test server and proxy of ``ragguard.testing`` follows: bind loopback only."""

from __future__ import annotations

import ipaddress

__all__ = ["check_loopback"]


def check_loopback(host: str, what: str) -> None:
    """Raise ``ValueError`` unless ``host`` is a loopback address or ``localhost``; ``what`` names the caller
    in the message (e.g. ``"the simulator only binds"``)."""
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"{what} loopback addresses (127.0.0.1, ::1, localhost), not {host!r}")
