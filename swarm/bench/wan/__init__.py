"""An emulated WAN on one machine: link profiles (`links`), delay proxies (`proxy`, a child process,
standard library only), the address map a client is given (`layout`) and peers started behind the
proxies (`swarm`).

Imports nothing itself, so the proxy process loads no more than the standard library.
"""
