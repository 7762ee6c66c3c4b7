"""A webhook receiver for ctpd, as a platform would write one: it verifies every request with the Standard Webhooks
reference library and acts on each ``webhook-id`` once (deliveries are at least once).

    python examples/webhook_receiver.py --port 9100 --secret-file secret.txt [--fail-first 2] [--log deliveries.jsonl]

The secret (``whsec_...``) is the one ``ctpd webhooks create`` printed; it is read from the file at each request,
so the receiver can start before the webhook exists. ``--fail-first N`` answers the first N verified requests
with 503, to watch the service retry them with the same ``webhook-id``. Each request is printed (and appended
to ``--log``) as one JSON line: id, type, job, whether the signature verified, whether it was new, the answer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import standardwebhooks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--secret-file", type=Path, required=True)
    parser.add_argument("--fail-first", type=int, default=0, help="answer the first N verified requests with 503")
    parser.add_argument("--log", type=Path, help="also append each request's JSON line to this file")
    args = parser.parse_args(argv)

    lock = threading.Lock()
    seen: set[str] = set()
    failures_left = [args.fail_first]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            headers = {key.lower(): value for key, value in self.headers.items()}
            message_id = headers.get("webhook-id", "")
            try:
                secret = args.secret_file.read_text().strip()
                payload = standardwebhooks.Webhook(secret).verify(body, headers)
                verified, error = True, None
            except (OSError, standardwebhooks.WebhookVerificationError) as refused:
                payload, verified, error = {}, False, str(refused) or type(refused).__name__
            with lock:
                if not verified:
                    status, new = 400, False
                elif failures_left[0] > 0:
                    failures_left[0] -= 1
                    status, new = 503, False  # not processed: the service will send the same id again
                else:
                    status, new = 204, message_id not in seen
                    seen.add(message_id)  # act on a message once, however often it comes
                line = json.dumps({
                    "webhook_id": message_id, "type": payload.get("type"),
                    "job_id": (payload.get("data") or {}).get("job_id"), "verified": verified,
                    "new": new, "answered": status, **({"error": error} if error else {}),
                    **({"data": payload.get("data")} if new else {}),
                })
                print(line, flush=True)
                if args.log:
                    with args.log.open("a") as log:
                        log.write(line + "\n")
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            return

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"listening on http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: stop quietly
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
