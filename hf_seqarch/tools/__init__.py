"""Tooling that is not model code (command line, compare harness, tasks): never exported to the Hub."""
