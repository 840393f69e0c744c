"""Ports for embedded servers come from below the ephemeral range and are never handed out twice."""

from __future__ import annotations

import socket

from app.launcher import _ephemeral_low, cluster_ports, free_port, free_port_block


def test_free_ports_are_below_the_ephemeral_range_distinct_and_bindable() -> None:
    ports = [free_port() for _ in range(50)] + cluster_ports(3) + [free_port_block(6)]
    assert len(set(ports)) == len(ports)
    assert all(p < _ephemeral_low() for p in ports)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", ports[0]))


def test_cluster_bus_ports_and_blocks_are_not_handed_out_again() -> None:
    [node] = cluster_ports(1)
    base = free_port_block(6)
    taken = {node, node + 10000, *range(base, base + 6)}
    assert taken.isdisjoint(free_port() for _ in range(500))
