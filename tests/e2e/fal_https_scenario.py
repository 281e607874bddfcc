"""Drives ``fal_client`` configured only by its environment, over https; prints a JSON report.

Run by ``test_fal_client_python.py`` in a child interpreter, because fal_client reads
``FAL_RUN_HOST`` / ``FAL_QUEUE_RUN_HOST`` when it is imported. The caller sets those, plus
``SSL_CERT_FILE`` (the test CA; httpx honours it) and ``FAL_KEY``. Usage:
``python fal_https_scenario.py <image data URI>``. The last stdout line is the report.
"""

from __future__ import annotations

import io
import json
import sys
from typing import Any

import fal_client
import httpx
from PIL import Image

ENDPOINT = "fal-ai/flux-pro/kontext/max"


def main(image_uri: str) -> dict[str, Any]:
    client = fal_client.SyncClient()  # key from FAL_KEY, hosts from FAL_*_HOST
    arguments = {"prompt": "Put a donut next to the flour.", "image_url": image_uri}
    report: dict[str, Any] = {}

    handle = client.submit(ENDPOINT, {**arguments, "seed": 11})
    report["status_url"] = handle.status_url
    updates = list(handle.iter_events(with_logs=True, interval=0.05))
    report["update_kinds"] = [type(u).__name__ for u in updates]
    report["log_messages"] = [
        e["message"] for u in updates for e in (getattr(u, "logs", None) or [])
    ]
    output = handle.get()
    report["subscribe_seed"] = output["seed"]

    # Rebuilt from FAL_QUEUE_RUN_HOST: https://host/queue/fal-ai/flux-pro/requests/<id>...
    report["result_by_id_seed"] = client.result(ENDPOINT, handle.request_id)["seed"]
    report["status_by_id"] = type(client.status(ENDPOINT, handle.request_id)).__name__

    report["run_seed"] = client.run(ENDPOINT, {**arguments, "seed": 12}, timeout=60)["seed"]

    try:
        client.submit(ENDPOINT, {**arguments, "aspect_ratio": "string"})
        report["invalid_status_code"] = None
    except fal_client.FalClientHTTPError as exc:
        report["invalid_status_code"] = exc.status_code

    [image] = output["images"]
    fetched = httpx.get(image["url"], timeout=10.0)  # verified against SSL_CERT_FILE too
    report["image"] = {
        **image,
        "fetched_status": fetched.status_code,
        "fetched_size": list(Image.open(io.BytesIO(fetched.content)).size),
        "fetched_bytes": len(fetched.content),
    }
    return report


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
