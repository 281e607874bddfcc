"""The service core: submit, get, cancel, auth, uploads, retention; protocol-free."""
