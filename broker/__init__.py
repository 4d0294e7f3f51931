"""An MCP authorization broker.

Agents point at the broker instead of at each tool server. For every MCP
message the broker authenticates the caller, decides with Cedar policies
whether the action may happen, forwards it with the broker's own credential
for the downstream server, and records the decision before answering.
"""

__version__ = "0.1.0"
