"""Black Forest Labs' skin: ``/v1/flux-kontext-*`` and ``/v1/get_result`` (PROTOCOL.md §11) and
BFL's webhook."""
