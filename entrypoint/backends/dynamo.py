"""NVIDIA Dynamo's runtime LoRA form, answered on the public port so that its users change
nothing: `POST /v1/loras {"lora_name", "source": {"uri"}}`, `GET /v1/loras`,
`DELETE /v1/loras/{name}` (Dynamo's `system_status_server.rs` and `lora_handler.py`).

Not a backend this project starts: only the wording and the shapes of Dynamo's answers live here.
Answers carry `status` "success" or "error" as Dynamo's do; an error keeps this server's own
HTTP status (403 for a URI not allowed, 404 for an unknown name) where Dynamo answers 500, so a
client that checks either sees the failure.
"""

from __future__ import annotations

import hashlib


def lora_id(name: str) -> int:
    """A stable positive 31-bit id for `name` (Dynamo derives its ids from a hash of the name
    too; the values differ from Dynamo's, which no client compares across servers)."""
    value = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big") & 0x7FFFFFFF
    return value or 1


def answer(ok: bool, message: str, name: object, *, unloaded: bool = False) -> dict:
    """The body of a load (or, with `unloaded`, an unload) answer."""
    if not ok:
        body: dict = {"status": "error", "message": message}
        if isinstance(name, str):
            body["lora_name"] = name
        return body
    assert isinstance(name, str)
    done = "unloaded" if unloaded else "loaded"
    return {"status": "success", "message": f"LoRA adapter '{name}' {done} successfully",
            "lora_name": name, "lora_id": lora_id(name)}


def listing(names: list[str]) -> dict:
    """`GET /v1/loras`: the served adapters, name -> id."""
    return {"status": "success", "loras": {name: lora_id(name) for name in sorted(names)},
            "count": len(names)}


def not_found(name: object, served: list[str]) -> str:
    return f"LoRA adapter '{name}' not found. Available LoRAs: {sorted(served)}"
