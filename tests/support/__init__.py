"""Helpers for tests that run real processes: free ports, polling waits, subprocesses, moto regions."""
