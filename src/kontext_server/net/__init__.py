"""Outbound network: the SSRF-safe fetcher."""
