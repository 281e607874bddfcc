"""fal.ai's skin: the queue and run routes, submission, the status stream, the storage and
proxy routes, the input models, and the rendering of results and webhooks (PROTOCOL.md §1-§10)."""
