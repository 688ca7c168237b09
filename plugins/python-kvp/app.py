"""Example KVP provider written in Python, built with componentize-py.

Publishes two guest-pool keys the Hyper-V host can read:

- ``python.greeting``: a fixed text, proof that a Python component answers;
- ``python.version``: the version of the Python interpreter inside the component.

Manifest:

    [[plugin]]
    name = "python-kvp"
    path = "/usr/lib/hvisd/plugins/python_kvp.wasm"
    worlds = ["kvp-provider"]
    [plugin.limits]
    memory-mib = 64          # the interpreter and its heap
    call-deadline-ms = 50
    [[plugin.kvp]]
    pool = "guest"
    keys = ["python.*"]
"""

import sys

from componentize_py_types import Err
from wit_world import exports
from wit_world.exports import kvp_provider
from wit_world.imports import logging
from wit_world.imports.types import (
    Error_NotFound,
    Pool,
    PoolKey,
    Value,
    Value_Text,
)

GREETING = "hello from Python"


def _version() -> str:
    v = sys.version_info
    return f"{v.major}.{v.minor}.{v.micro}"


class KvpProvider(exports.KvpProvider):
    def describe(self) -> kvp_provider.ProviderInfo:
        logging.log(logging.Level.INFO, f"python-kvp on Python {_version()}")
        return kvp_provider.ProviderInfo(
            owned_keys=[
                PoolKey(pool=Pool.GUEST, key="python.greeting"),
                PoolKey(pool=Pool.GUEST, key="python.version"),
            ],
            subscribe=[],
        )

    def get(self, pool: Pool, key: str) -> Value:
        if pool == Pool.GUEST and key == "python.greeting":
            return Value_Text(GREETING)
        if pool == Pool.GUEST and key == "python.version":
            return Value_Text(_version())
        raise Err(Error_NotFound(f"python-kvp does not own {key}"))

    def on_host_set(self, pool: Pool, key: str, value: Value) -> None:
        pass
