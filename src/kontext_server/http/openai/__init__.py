"""OpenAI's skin: ``POST /v1/images/edits`` (PROTOCOL.md §11)."""
