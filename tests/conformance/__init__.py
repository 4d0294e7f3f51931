"""The MCP conformance suite run against the broker: fixture server, shim, runner."""
