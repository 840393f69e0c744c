"""gRPC keepalive that Triton accepts: a Triton started with a strict ping policy (the defaults' shape,
scaled from 5 min to 2 s so the test is short) sends GOAWAY "too_many_pings" to a client pinging like the
gateway used to (idle pings, no cap), and never to a client with the gateway's options at the same scale
(ping interval 1.2x the server minimum, as 360 s is to Triton's 300 s), held idle then busy."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.clients.triton import channel_args
from app.launcher import EmbeddedTriton, free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SERVER_MIN_PING_MS = 2000


@pytest.fixture(scope="module")
def strict_triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedTriton]:
    server = EmbeddedTriton(
        [ROOT / "tests" / "models"], free_port(), free_port(), free_port(), tmp_path_factory.mktemp("ka"),
        extra_args=[f"--grpc-http2-min-recv-ping-interval-without-data={SERVER_MIN_PING_MS}",
                    "--grpc-http2-max-ping-strikes=2"],
    )  # fmt: skip
    server.start(timeout=180)
    yield server
    server.stop()


def test_default_options_match_tritons_default_policy() -> None:
    options = dict(channel_args())
    assert options["grpc.keepalive_time_ms"] >= 300_000  # --grpc-http2-min-recv-ping-interval-without-data
    assert options["grpc.keepalive_permit_without_calls"] == 0  # --grpc-keepalive-permit-without-calls=0
    assert options["grpc.http2.max_pings_without_data"] == 2  # --grpc-http2-max-pings-without-data


def test_no_goaway_with_the_gateways_options_held_idle_and_busy(strict_triton: EmbeddedTriton) -> None:
    ping_s = SERVER_MIN_PING_MS / 1000 * 1.2
    runs = {}
    for mode, ping in (("gateway", ping_s), ("aggressive", 0.4)):
        argv = [
            sys.executable,
            "-m",
            "tests.integration.keepalive_client",
            strict_triton.grpc_url,
            mode,
            "5",
            "5",
        ]
        runs[mode] = subprocess.Popen([*argv, str(ping)], cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)  # fmt: skip
    out = {mode: proc.communicate(timeout=90) for mode, proc in runs.items()}
    for mode, proc in runs.items():
        assert proc.returncode == 0, out[mode][1][-2000:]
        assert int(out[mode][0].split("calls=")[1]) >= 2  # it was busy: calls of 1.5 s each
    assert "too_many_pings" in out["aggressive"][1]  # the check sees a GOAWAY when there is one
    assert "too_many_pings" not in out["gateway"][1], out["gateway"][1][-2000:]
    assert "GOAWAY" not in out["gateway"][1]
