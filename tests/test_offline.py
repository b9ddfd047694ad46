"""The network guard works, and the default run's model and data resolve without it."""

import socket
import subprocess
import sys

import pytest


def test_a_connection_to_another_host_is_refused():
    with pytest.raises(ConnectionRefusedError, match="never use the network"):
        socket.create_connection(("93.184.216.34", 443), timeout=1)  # example.com's address


def test_subprocesses_are_guarded_too():
    code = "import socket; socket.create_connection(('93.184.216.34', 443), timeout=1)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode != 0 and "never use the network" in run.stderr


def test_default_model_resolves_with_the_hub_reachable_in_principle(monkeypatch):
    # HF_HUB_OFFLINE unset: the bundled copy must still be found before any hub call (the guard would raise)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    from embtune.model import from_pretrained, resolve_model_path

    path = resolve_model_path("sentence-transformers/all-MiniLM-L6-v2")
    model = from_pretrained(path)
    assert model.encode(["offline"]).shape == (1, 384)
