"""Region listeners on unix sockets: HAProxy reaches them through the file system (mode 0600), so no
other local user can make the sidecar sign requests, and the data path works exactly as over TCP."""

from __future__ import annotations

import socket
import stat
from pathlib import Path

import pytest

from tests.support.moto_region import MotoRegion
from tests.support.stack import SidecarStack, new_app_table


def test_unix_socket_listeners_serve_and_are_private(
    moto_regions: dict[str, MotoRegion], tmp_path_factory: pytest.TempPathFactory
) -> None:
    regions = [moto_regions["us-east-1"], moto_regions["eu-west-1"]]
    table = new_app_table(regions, "unix")
    stack = SidecarStack(regions, [table], tmp_path_factory.mktemp("unix"))
    stack.write_config(
        regions=[
            {"name": r.name, "endpoint": r.endpoint, "proxy": f"unix:run/{r.name}.sock"} for r in regions
        ]
    )
    with stack:
        stack.wait_regions_up()
        app = stack.client()
        app.put_item(TableName=table, Item={"pk": {"S": "via-unix"}})
        assert "Item" in app.get_item(TableName=table, Key={"pk": {"S": "via-unix"}}, ConsistentRead=True)
        home = (
            regions[0].client().get_item(TableName=table, Key={"pk": {"S": "via-unix"}}, ConsistentRead=True)
        )
        other = (
            regions[1].client().get_item(TableName=table, Key={"pk": {"S": "via-unix"}}, ConsistentRead=True)
        )
        assert "Item" in home and "Item" not in other

        sock_path = stack.workdir / "run" / "us-east-1.sock"
        mode = sock_path.stat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        # The health check answers over the socket, as HAProxy asks it.
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(str(sock_path))
            s.sendall(b"GET /ddb-sidecar/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := s.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200")
        assert {r["name"]: r["weight"] for r in stack.status()["regions"]} == {
            "us-east-1": 100,
            "eu-west-1": 0,
        }

        # A second daemon must not steal a live socket.
        second = SidecarStack(regions, [table], tmp_path_factory.mktemp("unix2"))
        second.write_config(
            regions=[
                {**r, "proxy": f"unix:{sock_path}"}
                if i == 0
                else {**r, "proxy": f"unix:{second.workdir}/eu.sock"}
                for i, r in enumerate(stack.config["regions"])
            ]
        )
        second.process.start()
        try:
            code = second.wait_exit(20)
        finally:
            second.stop()
        assert code != 0
        assert "in use" in Path(second.process.log_path).read_text()
        # ... and the first one keeps serving.
        assert "Item" in app.get_item(TableName=table, Key={"pk": {"S": "via-unix"}})
