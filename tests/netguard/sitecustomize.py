"""Test-time guard: any connection to a host other than this machine raises. The test suite puts this
folder on PYTHONPATH, so the CLI subprocesses and torchrun workers that tests start are guarded too.
Loopback (torchrun's rendezvous, wandb's local service) and Unix sockets stay allowed."""

import ipaddress
import socket

_connect = socket.socket.connect
_connect_ex = socket.socket.connect_ex


def _local(address) -> bool:
    if not isinstance(address, tuple):  # a Unix socket path
        return True
    host = address[0]
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:  # a host name: resolving it would already use the network
        return False


def _refuse(address):
    raise ConnectionRefusedError(f"embtune tests never use the network: connection to {address!r} refused")


def connect(self, address):
    if not _local(address):
        _refuse(address)
    return _connect(self, address)


def connect_ex(self, address):
    if not _local(address):
        _refuse(address)
    return _connect_ex(self, address)


socket.socket.connect = connect
socket.socket.connect_ex = connect_ex
